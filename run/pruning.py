"""How a sweep's pruner follows a trial: after each eval, rank 0 reports the eval loss into the run dir
and waits for the sweep's answer. The answer is either "go on" (a verdict file naming the step) or
SIGTERM: the pruner stopped the trial, which then stops after its next step with a checkpoint, as a
preempted run does (train/loop.py's stop path; no second one).

    RUN/eval_report.json    {"step": N, "eval_loss": x}   rank 0, after the eval at step N
    RUN/eval_verdict.json   {"step": N}                   the sweep: go on past step N

Both files exist only under a sweep that prunes (it sets PRUNING_ENV for the trial's processes) and
are removed by the sweep before each launch of the trial, so a resumed trial never reads an old answer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from lora_launch.run.rundir import write_json

PRUNING_ENV = "LORA_LAUNCH_PRUNING"  # set by a pruning sweep: rank 0 waits for a verdict after each eval
REPORT = "eval_report.json"
VERDICT = "eval_verdict.json"
# the sweep answers within a fraction of a second; past this, training goes on unpruned
VERDICT_WAIT_S = 300.0


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def report_eval(
    run_dir: Path, step: int, eval_loss: float, stopped: Callable[[], bool], timeout_s: float = VERDICT_WAIT_S
) -> None:
    """Rank 0, under a pruning sweep: report the eval loss of `step`, then wait until the sweep lets the
    trial go on, a stop signal arrived (`stopped()`: the pruner's SIGTERM, or any other), or `timeout_s`."""
    if not os.environ.get(PRUNING_ENV):
        return
    run_dir = Path(run_dir)
    write_json(run_dir / REPORT, {"step": step, "eval_loss": eval_loss})
    deadline = time.monotonic() + timeout_s
    while not stopped() and time.monotonic() < deadline:
        if _read(run_dir / VERDICT).get("step", -1) >= step:
            return
        time.sleep(0.05)


def read_report(run_dir: Path) -> dict | None:
    """The trial's latest eval report ({"step", "eval_loss"}), or None."""
    report = _read(Path(run_dir) / REPORT)
    return report if "step" in report else None


def go_on(run_dir: Path, step: int) -> None:
    """The sweep's answer to the report of `step`: train on."""
    write_json(Path(run_dir) / VERDICT, {"step": step})


def clear(run_dir: Path) -> None:
    """Remove a launch's reports and verdicts before the next launch of the trial."""
    for name in (REPORT, VERDICT):
        (Path(run_dir) / name).unlink(missing_ok=True)
