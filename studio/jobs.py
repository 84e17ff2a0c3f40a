"""The processes the studio starts: `lora-launch` launches (detached, in a session of their own, so the run
outlives the page and the studio), previews, and `lora-launch serve` endpoints; and what a run's files say.

Every command is an argv list of `key=value` overrides that passed the form's gate; nothing goes through a
shell. A launch's output goes to ROOT/.studio/<run>/launch.log, never into the run dir (a refused launch
leaves the run dir as it was).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lora_launch.catalog.runs import read_run
from lora_launch.conf.errors import PREFIX
from lora_launch.conf.schema import ConfigError
from lora_launch.run.lock import holder, lock_holders, lock_path
from lora_launch.run.process import ChildFate, run_to_end, spawn

CLI_MODULE = "lora_launch.cli"  # what the `lora-launch` console script runs
STATE = ".studio"
LAUNCH_WAIT_S = 180  # how long a launch is watched for its checks to pass (the lock taken) or a refusal
SERVE_WAIT_S = 300


def cli_argv(args: list[str]) -> list[str]:
    """The `lora-launch` process for `args`, run by this interpreter."""
    return [sys.executable, "-m", CLI_MODULE, *args]


def command_line(args: list[str]) -> str:
    """The equivalent command line, copyable into a shell."""
    return shlex.join(["lora-launch", *args])


def last_error(text: str) -> str:
    """The `error:` line a refused command printed (the launcher's own message), else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(PREFIX.strip())]
    line = errors[-1] if errors else (lines[-1] if lines else "it exited without a message")
    return line.removeprefix(PREFIX.strip()).strip()


def preview(root: Path, overrides: list[str], timeout: int = 300) -> str:
    """What `lora-launch <overrides> preview=true` prints; ConfigError with its error line when refused."""
    out = run_to_end(
        cli_argv([*overrides, "preview=true"]),
        cwd=root,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise ConfigError(last_error(out.stderr + "\n" + out.stdout))
    return out.stdout


# ---- launches ----------------------------------------------------------------------------------------


def check_run_dir(root: Path, run_dir: Path, given) -> None:
    """ConfigError naming run.dir when `run_dir` (resolved) would take the studio's own files: its root, a folder
    above it, its state (.studio/) or another studio's root."""
    if root.is_relative_to(run_dir):
        why = "is the studio's root" if run_dir == root else f"holds the studio's root ({root})"
    elif run_dir.is_relative_to(root / STATE) or (run_dir / STATE).exists():
        why = f"is or holds a studio's {STATE}/ folder"
    else:
        return
    # resume.mode=never moves what a run dir holds aside: here the user's files and the launch.log being written
    raise ConfigError(
        f"run.dir={given}: {run_dir} {why}; a launch may move what its run dir holds, so give the "
        "run a folder of its own, e.g. runs/NAME"
    )


def _state_dir(root: Path, run_dir: Path) -> Path:
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
    return root / STATE / f"{run_dir.name}-{digest}"


def launcher_pid(run_dir: Path) -> int | None:
    """The pid of the `lora-launch` that holds the run dir now, else None."""
    pid = holder(run_dir).get("pid")
    return pid if isinstance(pid, int) and pid in lock_holders(lock_path(run_dir)) else None


@dataclass
class Launches:
    """Launches started from this studio: their processes (to reap) and records under ROOT/.studio."""

    root: Path

    def __post_init__(self):
        self._procs: dict[Path, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def record(self, run_dir: Path) -> dict:
        try:
            return json.loads((_state_dir(self.root, run_dir) / "launch.json").read_text())
        except (OSError, ValueError):
            return {}

    def recorded_dirs(self) -> list[Path]:
        out = []
        for f in sorted((self.root / STATE).glob("*/launch.json")):
            try:
                out.append(Path(json.loads(f.read_text())["path"]))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def log_tail(self, run_dir: Path, lines: int = 40) -> str:
        try:
            text = (_state_dir(self.root, run_dir) / "launch.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, run_dir: Path, overrides: list[str]) -> dict:
        """Start `lora-launch <overrides>` detached and watch it until the run dir's lock is its own (launched)
        or it ends; a refusal raises ConfigError with the launcher's own error line."""
        state = _state_dir(self.root, run_dir)
        state.mkdir(parents=True, exist_ok=True)
        log = state / "launch.log"
        with self._lock:
            old = self._procs.get(run_dir)
            if old is not None and old.poll() is None and launcher_pid(run_dir) is None:
                raise ConfigError(
                    f"run.dir {run_dir}: a launch from this studio is still starting (pid {old.pid}); wait for it"
                )
            start = log.stat().st_size if log.exists() else 0
            with open(log, "ab") as out:
                out.write(f"\n$ {command_line(overrides)}\n".encode())
                out.flush()
                proc = spawn(
                    cli_argv(overrides),
                    fate=ChildFate.LIVES_ON,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self._procs[run_dir] = proc
        (state / "launch.json").write_text(
            json.dumps({"path": str(run_dir), "overrides": overrides, "pid": proc.pid, "started": time.time()})
        )
        deadline = time.monotonic() + LAUNCH_WAIT_S
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                text = log.read_bytes()[start:].decode(errors="replace")
                if rc != 0:
                    raise ConfigError(last_error(text))
                return {"pid": proc.pid, "state": "ended", "message": last_error(text)}
            if launcher_pid(run_dir) == proc.pid:
                _reap(proc)
                return {"pid": proc.pid, "state": "running", "message": f"launched (pid {proc.pid})"}
            time.sleep(0.2)
        _reap(proc)
        return {"pid": proc.pid, "state": "starting", "message": f"still starting (pid {proc.pid}); see its log"}

    def stop(self, run_dir: Path) -> dict:
        """SIGTERM to the run's `lora-launch`: every rank stops after its step with a checkpoint (preempted)."""
        pid = launcher_pid(run_dir)
        if pid is None:
            raise ConfigError(f"run.dir {run_dir}: no live launch holds it; nothing to stop")
        os.kill(pid, signal.SIGTERM)
        return {
            "pid": pid,
            "message": f"sent SIGTERM to lora-launch (pid {pid}): the run stops after its step and saves a checkpoint",
        }

    def resume_overrides(self, run_dir: Path) -> list[str]:
        """The command that launched the run: this studio's record, else the run's own (.hydra/overrides.yaml)."""
        recorded = self.record(run_dir).get("overrides")
        if isinstance(recorded, list) and recorded:
            return [str(o) for o in recorded]
        run = read_run(run_dir)
        if run.config is None:
            raise ConfigError(f"{run_dir}: {run.note or 'no config.yaml'}; nothing to resume")
        given = run.config.get("run", {}).get("dir") or str(run_dir)
        return [*run.overrides, f"run.dir={given}"]


def _reap(proc: subprocess.Popen) -> None:
    """Wait for a launch in a thread of its own, so that one that ends is not left <defunct> until the studio exits
    (started once the launch is no longer watched: Popen.poll() answers None while a wait() blocks)."""
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()


# ---- a run's progress --------------------------------------------------------------------------------


def progress(run_dir: Path) -> dict:
    """Status, curves and the latest step's numbers of a run, with an ETA while it runs."""
    run = read_run(run_dir)  # reads metrics.jsonl once: the curves, the last training row, recent step times
    last = run.last_train_row
    out = {
        "status": run.status,
        "note": run.note,
        "steps": run.steps,
        "train": run.train,
        "evals": run.evals,
        "lr": last.get("lr"),
        "tokens_per_s": last.get("tokens_per_s"),
        "peak_memory_gib": run.peak_memory_gib,
        "epoch": last.get("epoch"),
        "row": run.row(),
        "sample": run.sample,
        "total_steps": _total_steps(run, last),
        "eta_s": None,
    }
    times = run.step_times
    if run.status == "running" and out["total_steps"] and times:
        out["eta_s"] = max(0.0, (out["total_steps"] - run.steps) * sum(times) / len(times))
    return out


def _total_steps(run, last: dict) -> int | None:
    steps = run.setting("train.max_steps")
    if isinstance(steps, int) and steps > 0:
        return steps
    epochs, epoch = run.setting("train.epochs"), last.get("epoch")
    if isinstance(epoch, (int, float)) and epoch > 0 and isinstance(epochs, (int, float)):
        return round(run.steps * epochs / epoch)
    return None


# ---- serving a finished run ---------------------------------------------------------------------------

_SERVING = re.compile(r"serving .* on (http://\S+)/v1")


@dataclass
class Endpoint:
    proc: subprocess.Popen
    url: str
    model: str
    key: str


class Endpoints:
    """`lora-launch serve run.dir=RUN` processes, one per run, on free local ports; stopped with the studio."""

    def __init__(self, root: Path):
        self.root = root
        self._running: dict[Path, Endpoint] = {}
        self._lock = threading.Lock()

    def get(self, run_dir: Path) -> Endpoint | None:
        ep = self._running.get(run_dir)
        return ep if ep is not None and ep.proc.poll() is None else None

    def start(self, run_dir: Path) -> Endpoint:
        with self._lock:
            if self.get(run_dir):
                return self._running[run_dir]
            key = secrets.token_urlsafe(24)  # the endpoint answers only the studio
            state = _state_dir(self.root, run_dir)
            state.mkdir(parents=True, exist_ok=True)
            log = state / "serve.log"
            with open(log, "wb") as out:
                # not STOPS_WITH_PARENT: the kernel's parent-death signal follows the thread that started the
                # child, and this runs in one of the server's worker threads, which come and go
                proc = spawn(
                    cli_argv(["serve", f"run.dir={run_dir}", "host=127.0.0.1", "port=0"]),
                    fate=ChildFate.SHARES_TERMINAL,
                    cwd=self.root,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "LORA_LAUNCH_API_KEY": key},
                )
            deadline = time.monotonic() + SERVE_WAIT_S
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace")
                found = _SERVING.search(text)
                if found:
                    url = found.group(1)
                    models = _call(url + "/v1/models", key)["data"]
                    ep = Endpoint(proc, url, models[-1]["id"], key)  # the run's adapter comes after the base
                    self._running[run_dir] = ep
                    return ep
                if proc.poll() is not None:
                    raise ConfigError(f"serve: {last_error(text)}")
                time.sleep(0.3)
            proc.terminate()
            raise ConfigError(f"serve: the endpoint for {run_dir} did not start within {SERVE_WAIT_S} s")

    def ask(self, run_dir: Path, prompt: str, max_tokens: int) -> dict:
        ep = self.get(run_dir)
        if ep is None:
            raise ConfigError(f"{run_dir}: no endpoint runs for it; start one first")
        body = {
            "model": ep.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        answer = _call(ep.url + "/v1/chat/completions", ep.key, body)
        return {"model": ep.model, "text": answer["choices"][0]["message"]["content"], "usage": answer.get("usage")}

    def stop(self, run_dir: Path) -> None:
        ep = self._running.pop(run_dir, None)
        if ep is not None and ep.proc.poll() is None:
            ep.proc.terminate()
            try:
                ep.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                ep.proc.kill()

    def stop_all(self) -> None:
        for run_dir in list(self._running):
            self.stop(run_dir)

    def listing(self) -> dict[str, dict]:
        return {str(p): {"url": ep.url, "model": ep.model} for p, ep in self._running.items() if self.get(p)}


def _call(url: str, key: str, body: dict | None = None) -> dict:
    """One request to a local endpoint; its JSON error becomes one line."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise ConfigError(f"serve: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"serve: the endpoint did not answer ({e})") from None
