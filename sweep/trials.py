"""Sweep trials on disk: deterministic sweep and trial dirs, each trial's record, and the summaries.

`lora-launch -m lora.r=8,16 optim.lr=1e-4,2e-4` runs one trial per combination (sweep/sweeper.py
runs them). The sweep dir is named from the command line and each trial dir from its swept values,
so re-running the same command finds the same dirs: finished trials are skipped, stopped ones resume
from their checkpoints, and the rest run. Each trial dir holds `trial.json` (status, launches, error).

A trial is `completed` only when its launch exited 0 and its RUN/status.json says `finished`.
A trial stopped with a checkpoint stops the sweep: `interrupted` (Ctrl-C, exit 130) or `preempted`
(SIGTERM/SIGHUP, e.g. Slurm preempting the sweep's job; the sweep exits 0 so a requeue re-runs the
same command, which resumes that trial). A trial the sweep's pruner stopped is `pruned`: it stopped
with a checkpoint too, and a re-run skips it unless asked to continue it (sweep.resume_pruned=true).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from lora_launch.catalog.runs import TRIAL  # the trial's record, read by `lora-launch runs` too
from lora_launch.catalog.terminal import fit_table, terminal_width, wrap
from lora_launch.run.rundir import atomic_path, read_metrics, read_status, write_atomic, write_json

INTERRUPTED = 130  # lora-launch's exit code after Ctrl-C stopped training with a checkpoint
LOG_FILE = "lora-launch.log"  # a trial's launches' output, appended
_SWEEP_SYNTAX = re.compile(r",|^\w+\(|\b(range|choice|interval|glob)\(")
# how many trials run at once, in all, and whether pruned ones go on: the same sweep either way
_NOT_IN_NAME = ("sweep.parallel=", "sweep.trials=", "sweep.resume_pruned=")


def _user_args(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("-") and "=" in a]


def swept_keys(argv: list[str]) -> set[str]:
    """Keys given several values on the command line (`lora.r=8,16`, `optim.lr=range(...)`)."""
    keys = set()
    for arg in _user_args(argv):
        key, _, value = arg.partition("=")
        if _SWEEP_SYNTAX.search(value) and not value.startswith("["):
            keys.add(key.lstrip("+~"))
    return keys


def sweep_name(argv: list[str] | None = None) -> str:
    """Name of the sweep dir: a digest of the command line's overrides, order-independent."""
    args = sorted(a for a in _user_args(sys.argv[1:] if argv is None else argv) if not a.startswith(_NOT_IN_NAME))
    return "sweep-" + hashlib.sha1("\n".join(args).encode()).hexdigest()[:10]


def trial_name(job_overrides, argv: list[str] | None = None, keys: set[str] | None = None) -> str:
    """Name of a trial dir: its swept values (`lora.r=8,optim.lr=0.0001`), or a digest if none.

    The swept keys are `keys`, else those the command line `argv` gives several values."""
    if keys is None:
        keys = swept_keys(sys.argv[1:] if argv is None else argv)
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


# ---- one trial --------------------------------------------------------------------------------


def read_trial(run_dir: Path) -> dict:
    path = Path(run_dir) / TRIAL
    return json.loads(path.read_text()) if path.exists() else {}


def write_trial(run_dir: Path, record: dict) -> None:
    write_json(Path(run_dir) / TRIAL, record, indent=2)


def start_trial(run_dir: Path, overrides: list[str], resume_pruned: bool = False) -> dict | None:
    """Record a new launch of the trial in `run_dir`; None when there is nothing to run (it completed, or
    the pruner stopped it and `resume_pruned` is false)."""
    run_dir = Path(run_dir)
    record = read_trial(run_dir)
    if record.get("status") == "completed" or (record.get("status") == "pruned" and not resume_pruned):
        return None
    record.update(overrides=overrides, status="running")
    record.setdefault("launches", []).append({"started": time.time()})
    run_dir.mkdir(parents=True, exist_ok=True)
    write_trial(run_dir, record)
    return record


def finish_trial(
    run_dir: Path, record: dict, rc: int, error: str | None = None, pruned: bool = False, stopped_by_sweep: bool = False
) -> str:
    """Record how the launch `start_trial` began ended, from its exit code and RUN/status.json; returns the
    trial's status: completed, pruned, preempted, interrupted or failed.

    `pruned`: the sweep's pruner stopped it (a SIGTERM, so it stopped as a preempted run does).
    `stopped_by_sweep`: the sweep passed it a stop signal (Ctrl-C, SIGTERM); a launch that ended before
    training had anything to save is then stopped, not failed: a re-run starts it.
    """
    run_dir = Path(run_dir)
    launch = record["launches"][-1]
    launch.update(finished=time.time(), returncode=rc)
    record["wall_time"] = record.get("wall_time", 0.0) + (launch["finished"] - launch["started"])
    status = read_status(run_dir)
    record["status"] = trial_status(rc, status, launch["started"], record["launches"][0]["started"])
    if pruned and record["status"] == "preempted":
        record["status"] = "pruned"
    elif stopped_by_sweep and record["status"] == "failed":
        record["status"] = "interrupted" if rc == INTERRUPTED else "preempted"
    if record["status"] == "failed":
        record["error"] = error or _unfinished_error(rc, status, launch["started"]) or f"exit code {rc}"
    else:
        record.pop("error", None)  # an earlier launch's error, resumed past
    write_trial(run_dir, record)
    return record["status"]


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


def last_error(log: Path, offset: int = 0) -> str | None:
    """The last line that reports an error in `log` from byte `offset` on (what this launch wrote)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line for line in text.splitlines() if "rror" in line]
    return lines[-1][-300:] if lines else None


# ---- summaries --------------------------------------------------------------------------------

COLUMNS = [
    "trial",
    "overrides",
    "status",
    "steps",
    "final_train_loss",
    "best_eval_loss",
    "tokens_per_s",
    "wall_time_s",
    "error",
]


def trial_row(run_dir: Path) -> dict:
    """One summary row, computed from the trial's own files."""
    run_dir = Path(run_dir)
    record = read_trial(run_dir)
    rows = read_metrics(run_dir)  # a running trial's half-written last line is left out
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
    """Completed trials first, each group by best eval loss: a stopped trial's early loss is no result."""
    loss = row["best_eval_loss"]
    return (row["status"] != "completed", not math.isfinite(loss), loss if math.isfinite(loss) else 0.0, row["trial"])


def summarize(sweep_dir: Path) -> list[dict]:
    """Write summary.csv, summary.json, summary.md and sweep.png from the trial dirs; returns the rows,
    best first. Each file is replaced whole, so a reader never sees one half written."""
    sweep_dir = Path(sweep_dir)
    rows = sorted((trial_row(d) for d in sweep_dir.iterdir() if (d / TRIAL).exists()), key=_sort_key)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep_dir / "summary.csv", table.getvalue())
    write_json(
        sweep_dir / "summary.json",
        [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
        indent=1,
    )
    write_atomic(sweep_dir / "summary.md", _markdown(rows))
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
    colors = ["tab:blue" if r["status"] == "completed" else "tab:gray" for r in shown]  # gray: pruned, stopped
    ax.barh([r["trial"] for r in shown][::-1], [r["best_eval_loss"] for r in shown][::-1], color=colors[::-1])
    ax.set_xlabel("best eval loss")
    ax.set_title(f"{out.parent.name}: {len(shown)} of {len(rows)} trials with an eval loss")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


SHOWN = {
    "trial": "trial",
    "status": "status",
    "steps": "steps",
    "best_eval_loss": "best eval",
    "final_train_loss": "final loss",
    "tokens_per_s": "tok/s",
    "wall_time_s": "wall s",
    "error": "error",
}


def summary_text(sweep_dir: Path, rows: list[dict], width: int | None) -> str:
    """The summary table, best first, fitted to `width` columns (None: whole), and where summary.md is."""
    cols = list(SHOWN)
    cells = [[SHOWN[c] for c in cols]] + [[_fmt(r[c]) for c in cols] for r in rows]
    drop = [cols.index(c) for c in ("wall_time_s", "tokens_per_s", "final_train_loss", "steps")]
    cells, dropped = fit_table(cells, width, drop, [cols.index("error"), 0], keep_end=(0,))
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    if dropped:
        lines.append(wrap(f"(left out to fit: {', '.join(SHOWN[cols[i]] for i in dropped)})", width))
    return "\n".join(lines + [f"summary: {Path(sweep_dir) / 'summary.md'}"])  # whole, to be copied


def print_summary(sweep_dir: Path) -> None:
    """Rebuild the summary files from the trial dirs and print the table (`lora-launch sweep-summary`)."""
    print(summary_text(sweep_dir, summarize(sweep_dir), terminal_width(fallback=None)))
