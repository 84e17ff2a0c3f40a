"""The run directory on disk: one place for its layout, its status, atomic writes and what a restart
does to the files a killed attempt left.

    RUN/config.yaml          the resolved config every rank reads
    RUN/status.json          {"state": running|preempted|finished|failed, "step": N, "time": t[, "signal": NAME]
                              [, "restarts": [{"attempt", "step", "rank", "error", "time"}, ...]]}
    RUN/metrics.jsonl        one row per logged step (rewound to the checkpoint on resume)
    RUN/ranks/rank*.jsonl    the rank audit (rewound with metrics.jsonl)
    RUN/checkpoints/step-N/  committed checkpoints (a manifest.json marks one complete)
    RUN/attempts/A/          how attempt A of a launch ended: rankR.json (a rank's crash), nodeN.json (a node's part)
    RUN/previous-<time>/     everything of an earlier run, moved aside by resume.mode=never
    RUN/.lora-launch-run     written when lora-launch first writes the dir: it is a run's (see check_set_aside)

Every file here is written through `atomic_path` (a temporary name unique to this host and process,
then a rename), so a reader sees a whole file or the old one, also when nodes share the directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lora_launch.conf.schema import ConfigError

STATUS = "status.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---- atomic writes --------------------------------------------------------------------------------

# what to do about a file system fault, by errno: the user's to fix, so one line, not a traceback
_FAULT_HINTS = {
    errno.ENOSPC: "free space there or choose another run.dir / data.cache_dir",
    errno.EDQUOT: "the disk quota is used up: free space there or choose another run.dir / data.cache_dir",
    errno.EFBIG: "a file size limit (ulimit -f) was reached: raise it or choose another run.dir",
    errno.EROFS: "the file system is read-only: choose another run.dir / data.cache_dir",
    errno.EACCES: "make it writable or choose another run.dir / data.cache_dir",
    errno.EPERM: "make it writable or choose another run.dir / data.cache_dir",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter run.dir",
}


def short_path(path: Path | str) -> str:
    """A path as a message shows it: one of thousands of characters would drown the message."""
    name = str(path)
    return name if len(name) <= 200 else f"{name[:80]}...{name[-80:]} ({len(name)} characters)"


def missing_folders(path: Path | str) -> list[Path]:
    """The folders of `path` (itself included) that do not exist yet, innermost first: what creating it makes."""
    missing = []
    for folder in [Path(os.path.abspath(path)), *Path(os.path.abspath(path)).parents]:
        try:
            if folder.exists():
                break
        except OSError:  # a name too long to even look up
            pass
        missing.append(folder)
    return missing


def fault_message(e: OSError, where: Path | str | None = None) -> str | None:
    """One line for a file system fault the user can fix (disk full, read-only, permissions, a path too
    long), naming the file (or `where`, when the error does not say: a write to an open file); None for
    anything else, which is a bug and keeps its traceback."""
    hint = _FAULT_HINTS.get(e.errno)
    if hint is None:
        return None
    name = short_path(e.filename or where or "")
    where = f"{name}: " if name else ""
    return f"{where}{e.strerror or os.strerror(e.errno)}; {hint}"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so the renames in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path to write `path` through: renamed onto `path` when the block ends without an
    error, removed when it raises. The name is unique to this host and process (nodes may race)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(path: Path, data: str | bytes, fsync: bool = False) -> Path:
    """Write text or bytes to `path` atomically; returns `path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: Path, data, fsync: bool = False, indent: int = 1) -> Path:
    """JSON, atomically."""
    return write_atomic(path, json.dumps(data, indent=indent), fsync=fsync)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A fresh temporary directory that replaces the directory `path` when the block succeeds.

    The old directory is renamed away first and removed only after the new one is in place, so a
    crash leaves one of the two whole (for adapter/, merged/).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.rename(path.with_name(f".{path.name}.old.{os.getpid()}"))
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_config(cfg, run_dir: Path) -> Path:
    """RUN/config.yaml: the fully resolved config (secrets redacted) every rank reads; the dir is marked a run's."""
    import yaml

    from lora_launch.conf.compose import plain

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    if not (Path(run_dir) / RUN_MARKER).exists():
        write_atomic(
            Path(run_dir) / RUN_MARKER,
            "a lora-launch run dir: resume.mode=never moves aside only what lora-launch wrote here\n",
        )
    return write_atomic(Path(run_dir) / "config.yaml", yaml.safe_dump(plain(cfg), sort_keys=False))


# ---- status ---------------------------------------------------------------------------------------


def read_status(run_dir: Path) -> dict:
    """RUN/status.json, or {} when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, state: str, step: int, **extra) -> None:
    """Record the run's state (rank 0; the launcher when it gives up on restarts); the record of restarts stays."""
    status = {"state": state, "step": step, "time": time.time(), **extra}
    restarts = read_status(run_dir).get("restarts")
    if restarts:
        status.setdefault("restarts", restarts)
    write_json(Path(run_dir) / STATUS, status, fsync=True)


def record_restart(run_dir: Path, restart: dict) -> None:
    """Append one automatic restart to status.json's `restarts` (the launcher, while no rank runs)."""
    status = read_status(run_dir)
    status["restarts"] = [*status.get("restarts", []), restart]
    write_json(Path(run_dir) / STATUS, status, fsync=True)


def finished_step(run_dir: Path, resume_mode: str) -> int | None:
    """The step a finished run in `run_dir` ended at, when resume.mode=auto would find it finished."""
    status = read_status(run_dir)
    if resume_mode == "auto" and status.get("state") == "finished":
        return int(status["step"])
    return None


# ---- metrics ----------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl, oldest first; [] when there is none or it cannot be read.

    The file is appended to while a run trains and a kill can cut its last line short: a line that is
    not a whole JSON object is left out, and bytes that are not UTF-8 do not make the file unreadable.
    """
    try:
        lines = (Path(run_dir) / METRICS).read_text(errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---- checkpoints as the run dir lists them --------------------------------------------------------


def committed_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every committed checkpoint (one with its manifest), oldest first."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p)
        for p in ckpt_dir.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / "manifest.json").is_file()
    )


# ---- how each attempt of a launch ended: what a restart decides from ------------------------------

ATTEMPTS = "attempts"


def attempt_dir(run_dir: Path, attempt: int) -> Path:
    return Path(run_dir) / ATTEMPTS / str(attempt)


def write_attempt_record(run_dir: Path, attempt: int, name: str, record: dict) -> None:
    """RUN/attempts/<attempt>/<name>.json: `record`, with the time and host that wrote it."""
    folder = attempt_dir(run_dir, attempt)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", {**record, "time": time.time(), "host": socket.gethostname()})


def attempt_records(run_dir: Path, attempt: int, prefix: str, since: float) -> dict[str, dict]:
    """The records of an attempt whose names start with `prefix`, by name, written at `since` or later
    (older ones are an earlier launch's: every launch counts its attempts from 0)."""
    out = {}
    for path in sorted(attempt_dir(run_dir, attempt).glob(f"{prefix}*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # being replaced right now: its next version is read on the next poll
            continue
        if record.get("time", 0) >= since:
            out[path.stem] = record
    return out


def newest_logged_step(run_dir: Path) -> int | None:
    """The step of the last training row in metrics.jsonl (None: there is none)."""
    for row in reversed(read_metrics(run_dir)):
        if "loss" in row:
            return int(row["step"])
    return None


# ---- what a restart does to a killed attempt's files ----------------------------------------------


def _rewind_jsonl(path: Path, keep: Callable[[dict], bool]) -> int:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        if keep(row):
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def rewind_metrics(run_dir: Path, step: int, total_steps: int) -> int:
    """Drop rows a killed attempt wrote after `step` from metrics.jsonl and ranks/*.jsonl, so they hold
    one row per step after a resume; `step` -1 drops every row (a fresh start).

    Rows of `step` itself stay, except the final evaluation, which the resumed run writes again.
    Returns how many rows were dropped.
    """

    def keep(row: dict) -> bool:
        final_eval = row["step"] == step == total_steps and "eval_loss" in row
        return row["step"] < step or (row["step"] == step and not final_eval)

    run_dir = Path(run_dir)
    files = [run_dir / METRICS] + sorted((run_dir / "ranks").glob("rank*.jsonl"))
    return sum(_rewind_jsonl(f, keep) for f in files if f.exists())


# what a launch writes before training starts; training's own set-aside leaves these in place
LAUNCH_FILES = frozenset(
    {
        "config.yaml",
        "accelerate.yaml",
        "ds_config.json",
        "fsdp2.json",
        "slurm.sbatch",
        ".slurm-attempt",
        ".hydra",
        "data_report.json",
    }
)
RUN_MARKER = ".lora-launch-run"
# every other name lora-launch writes at the top of a run dir: training, the trackers, `merge`/`eval`, a sweep
# trial's record and log (sweep/trials.py), a pruning sweep's report and verdict (run/pruning.py)
_OWN_NAMES = LAUNCH_FILES | {
    RUN_MARKER,
    STATUS,
    METRICS,
    CHECKPOINTS,
    ATTEMPTS,
    "ranks",
    "adapter",
    "merged",
    "eval.json",
    "loss.png",
    "sample.txt",
    "tensorboard",
    "wandb",
    "mlruns",
    "mlflow_run_id",
    "trial.json",
    "lora-launch.log",
    "eval_report.json",
    "eval_verdict.json",
}
# locks, earlier set-asides, Slurm logs, rank logs, atomic writes' temporary names, the writability probe
_OWN_PATTERN = re.compile(
    r"\.(launch|ranks)\.lock(\.node\d+)?|previous-.+|slurm-\d+\.out|rank\d+\.log"
    r"|\..+\.(tmp|old)\..+|\.write-test\..+"
)


def _kept_always(name: str) -> bool:
    # the locks of live processes, the marker, earlier set-asides, and the Slurm job's own log (still being appended)
    return name.startswith((".launch.lock", ".ranks.lock", "previous-", "slurm-", RUN_MARKER)) or name.endswith(".tmp")


def written_by_us(name: str) -> bool:
    """Whether lora-launch writes an entry of this name at the top of a run dir."""
    return name in _OWN_NAMES or bool(_OWN_PATTERN.fullmatch(name))


def check_set_aside(run_dir: Path, keep: frozenset[str] = frozenset()) -> None:
    """Refuse (ConfigError) what set_aside_previous would do to a dir that is not a run's: the user's files are
    never moved. A run dir is one with the marker (or, made before it, with a status.json) holding only names
    lora-launch writes; an empty dir is fine too."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    names = sorted(p.name for p in run_dir.iterdir())
    foreign = [n for n in names if not written_by_us(n)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ConfigError(
            f"resume.mode=never would move {short_path(run_dir / foreign[0])}{more} aside, and "
            f"lora-launch did not write it: move what is yours out of {short_path(run_dir)}, or "
            "choose another run.dir"
        )
    movable = [n for n in names if not _kept_always(n) and n not in keep]
    if movable and RUN_MARKER not in names and read_status(run_dir).get("state") is None:
        raise ConfigError(
            f"resume.mode=never would move {short_path(run_dir / movable[0])} aside, but "
            f"{short_path(run_dir)} has no {RUN_MARKER} or status.json, so lora-launch did not make "
            "it: move what is yours out of it, or choose another run.dir"
        )


def set_aside_previous(run_dir: Path, keep: frozenset[str] = frozenset()) -> Path | None:
    """Move every file of an earlier run (checkpoints, metrics, status, adapter, plots, reports,
    tensorboard, ...) but the names in `keep` into RUN/previous-<time>/ (resume.mode=never); a dir holding
    anything lora-launch did not write is refused first, with nothing moved (check_set_aside)."""
    run_dir = Path(run_dir)
    check_set_aside(run_dir, keep)
    if not run_dir.is_dir():
        return None
    olds = sorted(p for p in run_dir.iterdir() if not _kept_always(p.name) and p.name not in keep)
    if not olds:
        return None
    stamp = time.strftime("previous-%Y%m%d-%H%M%S")
    dest, n = run_dir / stamp, 1
    while dest.exists():
        dest, n = run_dir / f"{stamp}-{n}", n + 1
    dest.mkdir()
    for p in olds:
        p.rename(dest / p.name)
    return dest
