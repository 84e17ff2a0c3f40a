"""Hydra sweeps where every trial is a full launch: deterministic trial dirs, skip/resume, summaries.

`lora-launch -m lora.r=8,16 optim.lr=1e-4,2e-4` runs one trial per combination. The sweep dir is
named from the command line and each trial dir from its swept values, so re-running the same
command finds the same dirs: finished trials are skipped, interrupted ones resume from their
checkpoints, and the rest run. Each trial dir holds `trial.json` (status, launches, error).

A trial is `completed` only when its launch exited 0 and its RUN/status.json says `finished`.
A trial stopped with a checkpoint stops the sweep: `interrupted` (Ctrl-C, exit 130) or `preempted`
(SIGTERM/SIGHUP, e.g. Slurm preempting the sweep's job; the sweep exits 0 so a requeue re-runs the
same command, which resumes that trial).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from lora_launch.run.rundir import read_status, write_json

TRIAL_FILE = "trial.json"
INTERRUPTED = 130  # lora-launch's exit code after Ctrl-C stopped training with a checkpoint
# names of the trials this process ran that failed: `lora-launch -m` exits 1 when there are any
FAILED_TRIALS: list[str] = []
_OPTUNA_PARAMS = "hydra.sweeper.params."
_SWEEP_SYNTAX = re.compile(r",|^\w+\(|\b(range|choice|interval|glob)\(")


def _user_args(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-") and "=" in a]


def swept_keys(argv: list[str]) -> set[str]:
    """Keys given several values on the command line (`lora.r=8,16`, `optim.lr=range(...)`)."""
    keys = set()
    for arg in _user_args(argv):
        key, _, value = arg.partition("=")
        if _SWEEP_SYNTAX.search(value) and not value.startswith("["):
            keys.add(key.lstrip("+~").removeprefix(_OPTUNA_PARAMS))
    return keys


def sweep_name(argv: list[str] | None = None) -> str:
    """Name of the sweep dir: a digest of the command line's overrides, order-independent."""
    args = sorted(_user_args(sys.argv[1:] if argv is None else argv))
    return "sweep-" + hashlib.sha1("\n".join(args).encode()).hexdigest()[:10]


def trial_name(job_overrides, argv: list[str] | None = None) -> str:
    """Name of a trial dir: its swept values (`lora.r=8,optim.lr=0.0001`), or a digest if none."""
    argv = sys.argv[1:] if argv is None else argv
    keys = swept_keys(argv)
    chosen = [o for o in job_overrides if o.partition("=")[0].lstrip("+~") in keys]
    if chosen:
        name = ",".join(sorted(chosen))
        return re.sub(r"[^\w.,=+-]", "_", name)[:120]
    return "trial-" + hashlib.sha1("\n".join(sorted(job_overrides)).encode()).hexdigest()[:10]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sweep_name"):
        OmegaConf.register_new_resolver("sweep_name", lambda: sweep_name())
    if not OmegaConf.has_resolver("trial_name"):
        OmegaConf.register_new_resolver("trial_name", lambda overrides: trial_name(list(overrides)))


def remove_unused_sweep_dir(sweep_dir: Path) -> None:
    """Remove a sweep dir that holds nothing but the multirun.yaml Hydra wrote for a refused sweep."""
    sweep_dir = Path(sweep_dir)
    try:
        if {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
            (sweep_dir / "multirun.yaml").unlink(missing_ok=True)
            sweep_dir.rmdir()
            sweep_dir.parent.rmdir()  # sweeps/ itself, when this was its only sweep
    except OSError:
        pass


# ---- one trial --------------------------------------------------------------------------------

def read_trial(run_dir: Path) -> dict:
    path = Path(run_dir) / TRIAL_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_trial(run_dir: Path, record: dict) -> None:
    write_json(Path(run_dir) / TRIAL_FILE, record, indent=2)


def run_trial(run_dir: Path, overrides: list[str], launch, continue_on_failure: bool = True) -> float:
    """Run one trial through `launch() -> returncode` unless it already finished; returns its best eval loss.

    A failed trial is recorded with its error and, unless told otherwise, does not stop the sweep.
    A trial stopped with a checkpoint (Ctrl-C, or SIGTERM/SIGHUP) stops the sweep; a re-run resumes it.
    """
    run_dir = Path(run_dir)
    record = read_trial(run_dir)
    if record.get("status") == "completed":
        print(f"sweep: {run_dir.name} finished earlier, skipped", flush=True)
        return trial_row(run_dir)["best_eval_loss"]
    record.update(overrides=overrides, status="running")
    record.setdefault("launches", []).append({"started": time.time()})
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_trial(run_dir, record)
    t0 = time.time()
    try:
        rc, error = launch(), None
    except SystemExit as e:
        rc, error = (e.code if isinstance(e.code, int) else 1), None
    except Exception as e:  # bad input for this trial (e.g. a value the schema rejects)
        rc, error = 2, f"{type(e).__name__}: {e}"
    record["launches"][-1].update(finished=time.time(), returncode=rc)
    record["wall_time"] = record.get("wall_time", 0.0) + (time.time() - t0)
    status = read_status(run_dir)
    started = record["launches"][-1]["started"]
    record["status"] = trial_status(rc, status, started, record["launches"][0]["started"])
    if record["status"] == "failed":
        record["error"] = error or _unfinished_error(rc, status, started) or _last_error(run_dir) or f"exit code {rc}"
        FAILED_TRIALS.append(run_dir.name)
    else:
        record.pop("error", None)  # an earlier launch's error, resumed past
    _write_trial(run_dir, record)
    if record["status"] in ("interrupted", "preempted"):
        # stopped with a checkpoint: the sweep stops too; the same command resumes this trial, then the rest
        print(f"sweep: stopped at {run_dir.name} ({record['status']}); run the same command to continue",
              file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED if record["status"] == "interrupted" else 0)
    if record["status"] == "failed" and not continue_on_failure:
        raise SystemExit(rc or 1)
    return trial_row(run_dir)["best_eval_loss"]


def trial_status(rc: int, status: dict, started: float, first_started: float) -> str:
    """`completed`, `preempted`, `interrupted` or `failed`, from a launch's exit code and RUN/status.json.

    `started` is this launch's start, `first_started` the trial's first launch's: a `finished` status
    written during an earlier launch of this trial counts too (the sweep was killed after the trial
    finished but before it was recorded, and this launch found the run finished).
    """
    if rc == INTERRUPTED:
        return "interrupted"
    if rc != 0:
        return "failed"
    written = status.get("time", -math.inf)
    if status.get("state") == "finished" and written >= first_started:
        return "completed"
    if status.get("state") == "preempted" and written >= started:
        return "preempted"
    return "failed"


def _unfinished_error(rc: int, status: dict, started: float) -> str | None:
    """Why a launch that exited 0 is not a completed trial."""
    if rc != 0:
        return None
    state = status.get("state") if status.get("time", -math.inf) >= started else None
    return f"launch exited 0 but training did not finish (status.json: {state or 'not written by this launch'})"


def _last_error(run_dir: Path) -> str | None:
    for name in ("train.log", "cli.log", "lora-launch.log"):
        path = run_dir / name
        if path.exists():
            lines = [l for l in path.read_text(errors="replace").splitlines() if "rror" in l]
            if lines:
                return lines[-1][-300:]
    return None


# ---- summaries --------------------------------------------------------------------------------

COLUMNS = ["trial", "overrides", "status", "steps", "final_train_loss", "best_eval_loss", "tokens_per_s",
           "wall_time_s", "error"]


def trial_row(run_dir: Path) -> dict:
    """One summary row, computed from the trial's own files."""
    run_dir = Path(run_dir)
    record = read_trial(run_dir)
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    return {
        "trial": run_dir.name,
        "overrides": " ".join(record.get("overrides", [])),
        "status": record.get("status", "unknown"),
        "steps": train[-1]["step"] if train else 0,
        "final_train_loss": train[-1]["loss"] if train else math.nan,
        "best_eval_loss": min(evals) if evals else math.nan,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else math.nan,
        "wall_time_s": record.get("wall_time", math.nan),
        "error": record.get("error", ""),
    }


def _sort_key(row: dict):
    loss = row["best_eval_loss"]
    return (not math.isfinite(loss), loss if math.isfinite(loss) else 0.0, row["trial"])


def summarize(sweep_dir: Path) -> list[dict]:
    """Write summary.csv, summary.md and sweep.png from the trial dirs; returns the rows, best first."""
    sweep_dir = Path(sweep_dir)
    rows = sorted((trial_row(d) for d in sweep_dir.iterdir() if (d / TRIAL_FILE).exists()), key=_sort_key)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(_markdown(rows))
    _plot(rows, sweep_dir / "sweep.png")
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if c != "overrides"]  # the trial's name is its swept values
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if math.isfinite(r["best_eval_loss"])]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * max(len(shown), 1)))
    ax.barh([r["trial"] for r in shown][::-1], [r["best_eval_loss"] for r in shown][::-1])
    ax.set_xlabel("best eval loss")
    ax.set_title(f"{out.parent.name}: {len(shown)} of {len(rows)} trials with an eval loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def print_summary(sweep_dir: Path) -> None:
    """Rebuild the summary files from the trial dirs and print the table (`lora-launch sweep-summary`)."""
    print(_markdown(summarize(sweep_dir)), end="")
