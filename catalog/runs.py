"""The runs on disk, read back: every run dir and sweep trial under some folders, summarised from the run
contract's files alone (RUN/config.yaml, status.json, metrics.jsonl, adapter/, a trial's trial.json) without
loading a model or importing the training code.

A run whose files are half written, unreadable or still being written is a run all the same: reading it
never raises; its `status` and `note` say what was found.
"""

from __future__ import annotations

import json
import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora_launch.conf.schema import dotted
from lora_launch.run.lock import holder, lock_holders
from lora_launch.run.rundir import METRICS, STATUS, read_metrics, short_path

TRIAL = "trial.json"  # a sweep trial's record (sweep/trials.py writes it; a trial is a run too)
_RUN_FILES = ("config.yaml", STATUS, METRICS, TRIAL)
MAX_DEPTH = 4  # runs/NAME, sweeps/SWEEP/TRIAL, and a folder or two above them
_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's where built: a config reads 5x faster


@dataclass
class Run:
    """One run dir (or sweep trial) as its files describe it."""

    path: Path
    name: str  # the path as the user reaches it: the folder they named, then the path below it
    status: str  # finished | running | preempted | interrupted | pruned | failed | killed | broken | not started
    note: str = ""  # why it failed, was killed or cannot be read
    config: dict | None = None  # RUN/config.yaml; None when it cannot be read
    overrides: list[str] = field(default_factory=list)  # the command line's (a trial's: the sweep's for it)
    sweep: Path | None = None  # the sweep dir, for a trial
    steps: int = 0
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, train loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss), finite ones
    tokens_per_s: float | None = None  # mean over the logged training steps, as the sweep summary's
    peak_memory_gib: float | None = None
    time: float | None = None  # when the run last changed state (status.json), else config.yaml's mtime
    adapter: Path | None = None
    restarts: int = 0
    sample: str = ""  # the end-of-run sample (RUN/sample.txt): prompt and completion
    last_train_row: dict = field(default_factory=dict)  # metrics.jsonl's last row with a train loss
    step_times: list[float] = field(default_factory=list)  # the last 20 training rows' step_time

    @property
    def best_eval_loss(self) -> float | None:
        return min(loss for _, loss in self.evals) if self.evals else None

    @property
    def final_eval_loss(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    @property
    def final_train_loss(self) -> float | None:
        return self.train[-1][1] if self.train else None

    def setting(self, key: str):
        """A dotted config key's value (`lora.r`), None when the config lacks it or cannot be read."""
        return dotted(self.config, key)

    def row(self) -> dict:
        """The run's summary under the names `lora-launch runs` sorts, filters and prints by."""
        processes, machines = self.setting("launcher.num_processes"), self.setting("launcher.num_machines") or 1
        return {
            "name": self.name,
            "status": self.status,
            "steps": self.steps,
            "max_steps": self._max_steps(),
            "model": self._model(),
            "quant": self.setting("quant.mode"),
            "r": self.setting("lora.r"),
            "alpha": self.setting("lora.alpha"),
            "lr": self.setting("optim.lr"),
            "data": self._data(),
            "distributed": self.setting("distributed.name"),
            "processes": processes * machines if isinstance(processes, int) else processes,
            "best_eval_loss": self.best_eval_loss,
            "final_eval_loss": self.final_eval_loss,
            "final_train_loss": self.final_train_loss,
            "tokens_per_s": self.tokens_per_s,
            "peak_memory_gib": self.peak_memory_gib,
            "restarts": self.restarts,
            "adapter": str(Path(self.name) / "adapter") if self.adapter else None,
            "date": _iso(self.time),
            "sweep": str(self.sweep) if self.sweep else None,
            "path": str(self.path.resolve()),
            "overrides": self.overrides,
            "note": self.note,
        }

    def _max_steps(self) -> int | None:
        steps = self.setting("train.max_steps")
        return steps if isinstance(steps, int) and steps > 0 else None

    def _model(self) -> str | None:
        path = self.setting("model.path") or self.setting("model.name")
        if path is None:
            return None
        # a local model dir by its folder name; a hub id (OWNER/NAME) as it is
        return Path(str(path)).name if str(path).startswith(("/", ".", "~")) else str(path)

    def _data(self) -> str | None:
        sources = self.setting("data.sources")
        if sources:
            return f"{len(sources)} sources"
        source, path, name = self.setting("data.source"), self.setting("data.path"), self.setting("data.name")
        if source == "local" and path:
            return Path(str(path)).name
        shown = path if source == "hub" and path else name  # a hub dataset by its id, the bundled one by name
        return None if shown is None else str(shown)


def _iso(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else None


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys (`lora.r`) of leaf values; lists stay whole."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---- finding runs ---------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a run's (or a sweep trial's) files (False where this user may not look)."""
    try:
        return any((path / name).is_file() for name in _RUN_FILES)
    except OSError:
        return False


def find_runs(folders: list[Path]) -> list[Run]:
    """Every run dir at or below `folders` (hidden folders and a run's own subfolders are not searched)."""
    runs = []
    for folder in folders:
        folder = Path(folder)
        if is_run_dir(folder):
            runs.append(read_run(folder, str(folder)))
            continue
        for path in _run_dirs_below(folder, MAX_DEPTH):
            runs.append(read_run(path, str(folder / path.relative_to(folder))))
    return runs


def _run_dirs_below(folder: Path, depth: int) -> list[Path]:
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # unreadable, or gone meanwhile
        return []
    found = []
    for child in children:
        if is_run_dir(child):
            found.append(child)
        elif depth > 1:
            found += _run_dirs_below(child, depth - 1)
    return found


# ---- reading one run ------------------------------------------------------------------------------


def read_run(path: Path, name: str | None = None) -> Run:
    """The run in `path` as its files describe it; never raises for what the files hold."""
    path = Path(path)
    run = Run(path=path, name=name or str(path), status="not started")
    try:
        return _read(run)
    except OSError as e:  # a file or folder of it this user may not read
        run.status, run.note = "broken", f"{short_path(e.filename or path)}: {e.strerror}"
        return run


def _read(run: Run) -> Run:
    path = run.path
    config_problem = _read_config(run)
    status, trial = _read_json(path / STATUS), _read_json(path / TRIAL)
    _read_metrics(run)
    run.overrides = _overrides(path, trial)
    run.sweep = path.parent if trial else None
    run.restarts = len(status["restarts"]) if isinstance(status.get("restarts"), list) else 0
    run.steps = max(run.steps, _int(status.get("step")))
    run.time = _number(status.get("time")) or _mtime(path / "config.yaml") or _mtime(path)
    if (path / "adapter" / "adapter_config.json").is_file():
        run.adapter = path / "adapter"
    run.sample = _read_text(path / "sample.txt")[:500].strip()
    run.status, run.note = _status(path, status, trial, config_problem)
    return run


def _status(path: Path, status: dict, trial: dict, config_problem: str | None) -> tuple[str, str]:
    """(status, note): a live process first, then what status.json and trial.json recorded."""
    state, trial_state = status.get("state"), trial.get("status")
    if _live(path):
        return "running", ""
    if state == "finished" and not config_problem:
        return "finished", ""
    if trial_state in ("pruned", "failed", "interrupted"):
        return trial_state, str(trial.get("error") or "")
    if config_problem:
        return "broken", config_problem
    if state == "running":
        other = holder(path).get("host") if isinstance(holder(path), dict) else None
        if other and other != socket.gethostname():
            return "running", f"on {other} (not checked from here)"
        return "killed", f"status.json says running at step {status.get('step')} but no process holds the run dir"
    if state in ("preempted", "failed"):
        return state, str(status.get("error") or status.get("signal") or "")
    return "not started", "no status.json: training never started (or its launch was refused)"


def _live(path: Path) -> bool:
    """Whether a process on this host holds the run dir's launch or ranks lock (run/lock.py)."""
    return any(lock_holders(p) for p in [*path.glob(".launch.lock*"), *path.glob(".ranks.lock*")])


def _read_config(run: Run) -> str | None:
    """Load RUN/config.yaml into run.config; returns what is wrong with it, or None."""
    path = run.path / "config.yaml"
    if not path.is_file():
        return "no config.yaml"
    try:
        config = yaml.load(path.read_text(), Loader=_YAML)
    except (OSError, UnicodeDecodeError) as e:
        return f"config.yaml cannot be read ({e.__class__.__name__})"
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return "config.yaml is not valid YAML" + (f" (line {mark.line + 1})" if mark else "")
    if not isinstance(config, dict):
        return "config.yaml is not a mapping of keys (half written?)"
    run.config = config
    return None


def _read_metrics(run: Run) -> None:
    """Loss curves, speed and memory from metrics.jsonl; lines cut short by a kill are left out."""
    speeds, memory = [], []
    for row in read_metrics(run.path):
        try:
            step = int(row["step"])
        except (ValueError, TypeError, KeyError):
            continue
        if "loss" in row:  # a training row, its loss finite or not
            run.last_train_row = row
            if _finite(row.get("step_time")):
                run.step_times = [*run.step_times[-19:], float(row["step_time"])]
        if _finite(row.get("loss")):
            run.train.append((step, float(row["loss"])))
            run.steps = max(run.steps, step)
        if _finite(row.get("eval_loss")):
            run.evals.append((step, float(row["eval_loss"])))
        if _finite(row.get("tokens_per_s")):
            speeds.append(float(row["tokens_per_s"]))
        if _finite(row.get("peak_memory_gib")):
            memory.append(float(row["peak_memory_gib"]))
    run.tokens_per_s = sum(speeds) / len(speeds) if speeds else None
    run.peak_memory_gib = max(memory) if memory else None


def _overrides(path: Path, trial: dict) -> list[str]:
    """The overrides the run was launched with: trial.json's for a trial, else .hydra/overrides.yaml's."""
    if isinstance(trial.get("overrides"), list):
        return [str(o) for o in trial["overrides"]]
    try:
        listed = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return []
    return [str(o) for o in listed if not str(o).startswith("run.dir=")] if isinstance(listed, list) else []


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _number(value) -> float | None:
    return float(value) if _finite(value) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
