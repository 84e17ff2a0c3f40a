"""Hydra sweeps where every trial is a full launch: deterministic trial dirs, skip/resume, summaries.

`lora-launch -m lora.r=8,16 optim.lr=1e-4,2e-4` runs one trial per combination. The sweep dir is
named from the command line and each trial dir from its swept values, so re-running the same
command finds the same dirs: finished trials are skipped, interrupted ones resume from their
checkpoints, and the rest run. Each trial dir holds `trial.json` (status, launches, error).
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

from lora_launch.run.rundir import write_json

TRIAL_FILE = "trial.json"
INTERRUPTED = 130  # lora-launch's exit code after Ctrl-C stopped training with a checkpoint
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


# ---- one trial --------------------------------------------------------------------------------

def read_trial(run_dir: Path) -> dict:
    path = Path(run_dir) / TRIAL_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_trial(run_dir: Path, record: dict) -> None:
    write_json(Path(run_dir) / TRIAL_FILE, record, indent=2)


def run_trial(run_dir: Path, overrides: list[str], launch, continue_on_failure: bool = True) -> float:
    """Run one trial through `launch() -> returncode` unless it already finished; returns its best eval loss.

    A failed trial is recorded with its error and, unless told otherwise, does not stop the sweep.
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
    record["status"] = "completed" if rc == 0 else "interrupted" if rc == INTERRUPTED else "failed"
    if rc not in (0, INTERRUPTED):
        record["error"] = error or _last_error(run_dir) or f"exit code {rc}"
    _write_trial(run_dir, record)
    if rc == INTERRUPTED:  # Ctrl-C: the trial checkpointed; the sweep stops, a re-run continues it
        raise SystemExit(rc)
    if rc != 0 and not continue_on_failure:
        raise SystemExit(rc)
    return trial_row(run_dir)["best_eval_loss"]


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
