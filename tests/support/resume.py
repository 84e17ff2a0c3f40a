"""Helpers for the resume tests: start a real `lora-launch`, kill its whole process tree, read results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from support.cli import CLI, read_jsonl, subprocess_env

# small and quick, yet with grad_accum > 1, an epoch boundary every ~3 steps and dropout drawing RNG; no
# automatic restarts: these tests kill or crash a run and relaunch it by hand
BASE = [
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "data.max_samples=24",
    "train.max_steps=12",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=2",
    "logging.tensorboard=false",
    "logging.rank_audit=true",
    "sample.max_new_tokens=0",
    "eval.at_start=false",
    "lora.dropout=0.1",
    "launcher.max_restarts=0",
]


def user_dir(run_dir: Path) -> Path:
    """Where a launch starts, as a user's does: their own project directory beside the run, holding a
    `train.py` and a `conf/` of its own that the installed package must never pick up. The decoy `train.py`
    leaves a file behind if anything ever runs or imports it (`assert_user_code_untouched`)."""
    d = Path(run_dir).absolute().parent / "user-project"
    if not (d / "train.py").exists():
        (d / "conf").mkdir(parents=True, exist_ok=True)
        (d / "conf" / "config.yaml").write_text("defaults: [this_group_does_not_exist]\n")
        (d / "train.py").write_text("open(__file__ + '.ran', 'w').close()\nraise SystemExit('the user train.py ran')\n")
    return d


def assert_user_code_untouched(run_dir: Path) -> None:
    ran = user_dir(run_dir) / "train.py.ran"
    assert not ran.exists(), f"the user's own train.py in {ran.parent} ran"


def start(run_dir: Path, overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start `lora-launch` in its own session from `user_dir` (output in run_dir.log); returns the process."""
    run_dir = Path(run_dir).absolute()
    cmd = [CLI, f"run.dir={run_dir}", *overrides]
    log = open(f"{run_dir}.log", "a")
    return subprocess.Popen(
        cmd,
        env={**subprocess_env(), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=user_dir(run_dir),
    )


def launch(run_dir: Path, overrides: list[str], env: dict | None = None, timeout: int = 300) -> tuple[int, str]:
    """Run `lora-launch` to the end; returns (exit code, what this launch printed)."""
    before = _log_size(run_dir)
    proc = start(run_dir, overrides, env)
    rc = proc.wait(timeout=timeout)
    assert_user_code_untouched(run_dir)
    return rc, Path(f"{run_dir}.log").read_text()[before:]


def under(strategy: str, processes: int = 2) -> list[str]:
    """BASE under `strategy` on `processes` ranks: the one spelling that keys a shared reference run."""
    return [*BASE, f"distributed={strategy}", f"launcher.num_processes={processes}"]


_references: dict[tuple, dict] = {}


def reference(tiny: dict, root: Path, overrides: list[str]) -> dict:
    """Losses of an uninterrupted local run of the tiny model with `overrides` ({"train", "eval", "dir"}), run
    once per session and shared by every test that compares an interrupted run of the same command with it."""
    from support.ports import free_port

    key = (str(tiny["model"]), *overrides)
    if key not in _references:
        run = Path(root) / f"reference-{len(_references)}"
        rc, log = launch(run, [*tiny["overrides"], *overrides, f"launcher.main_process_port={free_port(span=4)}"])
        assert rc == 0, log[-3000:]
        _references[key] = {"train": train_losses(run), "eval": eval_losses(run), "dir": run}
    return _references[key]


def _log_size(run_dir: Path) -> int:
    path = Path(f"{run_dir}.log")
    return len(path.read_text()) if path.exists() else 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def sigterm_at(run_dir: Path, overrides: list[str], step: int) -> tuple[int, float]:
    """Start a run, send SIGTERM to the launcher's process group once it trained past `step` and past
    any rows an earlier, killed launch left; returns (exit code, seconds from SIGTERM to exit)."""
    step = max(step, newest_step(run_dir) + 1)
    proc = start(run_dir, overrides)
    wait_for_step(run_dir, proc, step)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # what Slurm and cloud preemption send
    rc = proc.wait(timeout=120)
    seconds = time.monotonic() - t0
    assert_user_code_untouched(run_dir)
    return rc, seconds


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the launcher and every process under it at once (ranks live in their own sessions)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=120)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> int:
    """Block until metrics.jsonl has a training row at `step` or later; returns the newest step seen."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before step {step}:\n" + Path(f"{run_dir}.log").read_text()[-3000:]
            )
        newest = _newest_step(path)
        if newest >= step:
            return newest
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout} s")


def newest_step(run_dir: Path) -> int:
    """The newest training step in metrics.jsonl (0 if none)."""
    return _newest_step(run_dir / "metrics.jsonl")


def _newest_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]
    return max(steps, default=0)


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row, in file order."""
    return [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r]


def status(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the committed checkpoints (directories with a manifest)."""
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if (p / "manifest.json").exists())


def train_size(log: str) -> int:
    """Number of training samples, from the run's log line."""
    return int(re.search(r"(\d+) train / \d+ val samples", log).group(1))


def consumed_samples(run_dir: Path) -> dict[int, list[int]]:
    """Per step, the training-set indices all ranks consumed; a resumed run's record of a step wins."""
    per_rank: dict[tuple[str, int], list[int]] = {}
    for f in sorted((run_dir / "ranks").glob("rank*.jsonl")):
        for row in read_jsonl(f):
            per_rank[(f.name, row["step"])] = row["samples"]  # later rows (the resumed run) overwrite
    steps: dict[int, list[int]] = {}
    for (_, step), samples in per_rank.items():
        steps.setdefault(step, []).extend(samples)
    return steps


def stopped_and_resumed_equals_uninterrupted(tmp_path: Path, args: list[str]) -> str:
    """An 8-step run stopped with SIGTERM after step 3 and re-run trains to the uninterrupted run's losses, bit for
    bit; returns what the uninterrupted launch printed."""
    ref = tmp_path / "reference"
    rc, ref_log = launch(ref, args)
    assert rc == 0, ref_log[-3000:]
    run = tmp_path / "run"
    rc, _ = sigterm_at(run, args, 3)
    assert rc == 0 and status(run)["state"] == "preempted", (rc, status(run))
    rc, log = launch(run, args)
    assert rc == 0 and "resumed from" in log, log[-3000:]
    assert train_losses(run) == train_losses(ref) and [s for s, _ in train_losses(ref)] == list(range(1, 9))
    return ref_log
