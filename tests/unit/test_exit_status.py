"""The launcher's exit status follows status.json, not the exit code of `accelerate launch`."""

from __future__ import annotations

import signal
import time

import pytest

from lora_launch.launcher.node import exit_code
from lora_launch.launcher.supervise import Outcome
from lora_launch.run.rundir import write_status


@pytest.mark.parametrize(
    "state,outcome,want",
    [
        ("finished", Outcome(0), 0),
        ("preempted", Outcome(0, signal.SIGTERM), 0),  # Slurm preemption: requeue and continue
        ("preempted", Outcome(0, signal.SIGHUP), 0),
        ("preempted", Outcome(0, signal.SIGINT), 130),  # Ctrl-C: the shell convention, scripts stop
        ("preempted", Outcome(-9, signal.SIGINT, killed=True), 130),
        ("running", Outcome(0), 1),  # accelerate said 0 but training never finished
        ("running", Outcome(2), 2),
        ("running", Outcome(-9, signal.SIGINT, killed=True), 130),
        ("running", Outcome(-15, signal.SIGTERM), 128 + signal.SIGTERM),
        (None, Outcome(0), 1),
    ],
)
def test_exit_code(tmp_path, state, outcome, want, capsys):
    started = time.time()
    if state is not None:
        write_status(tmp_path, state, 7, **({"signal": "SIGTERM"} if state == "preempted" else {}))
    assert exit_code(tmp_path, outcome, started) == want
    said = capsys.readouterr()
    if want == 0 and state == "preempted":
        assert "with a checkpoint at step 7; run the same command to continue" in said.out
    if want not in (0, 130, 2):  # 2: the rank printed its own one-line error
        assert said.err.startswith("error: ") or "stopped by" in said.err


def test_a_status_from_an_earlier_launch_does_not_count(tmp_path):
    write_status(tmp_path, "finished", 7)
    assert exit_code(tmp_path, Outcome(0), started=time.time() + 5) == 1
