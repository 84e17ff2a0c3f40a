"""Runs that restart themselves (launcher.max_restarts): real 2-rank runs on CPU where one rank is
SIGKILLed mid-run, or crashes after the same step every time."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from lora_launch.launcher.supervise import supervise
from support import inject
from support.ports import free_port
from support.restart import RESTART_BASE, kill_rank
from support.resume import eval_losses, launch, reference, start, status, train_losses, wait_for_step

pytestmark = pytest.mark.slow

ARGS = [*RESTART_BASE, "launcher.num_processes=2"]


def test_a_rank_killed_mid_run_is_restarted_and_the_run_ends_as_if_uninterrupted(tiny, tmp_path_factory, tmp_path):
    ref = reference(tiny, tmp_path_factory.getbasetemp(), ARGS)
    run = tmp_path / "run"
    proc = start(run, [*tiny["overrides"], *ARGS, f"launcher.main_process_port={free_port(span=4)}"])
    wait_for_step(run, proc, 7)  # past the checkpoint at step 6
    kill_rank(proc.pid, 1)
    rc = proc.wait(timeout=600)
    log = (tmp_path / "run.log").read_text()
    assert rc == 0, log[-4000:]

    restarts = re.findall(r"^restart (\d+) of 2: (.*)$", log, re.M)
    assert [n for n, _ in restarts] == ["1"], log[-4000:]
    assert re.match(r"rank 1 failed after step \d+ \(killed by SIGKILL\); relaunching from", restarts[0][1])
    resumed_at = int(re.search(r"from the checkpoint at step (\d+)", restarts[0][1]).group(1))
    assert resumed_at >= 6 and resumed_at % 3 == 0
    assert f"step-{resumed_at}" in log.split("restart 1 of 2")[1]  # training said it resumed from there

    # every step once, and bit for bit the losses of the run nobody killed
    assert train_losses(run) == ref["train"]
    assert eval_losses(run) == ref["eval"]
    st = status(run)
    assert st["state"] == "finished"
    assert [r["attempt"] for r in st["restarts"]] == [1]
    assert st["restarts"][0]["step"] >= resumed_at


def test_a_failure_repeating_after_the_same_step_is_retried_once_then_named(tiny, tmp_path):
    run = tmp_path / "run"
    rc, log = launch(
        run,
        [*tiny["overrides"], *ARGS, "launcher.max_restarts=3", f"launcher.main_process_port={free_port(span=4)}"],
        env=inject.env(FAIL_AFTER_STEP="5"),
    )
    assert rc == 1, log[-4000:]
    injected = "RuntimeError: FAIL_AFTER_STEP=5: injected failure after step 5"
    restarts = re.findall(r"^restart \d+ of 3: .*$", log, re.M)
    assert restarts == [
        f"restart 1 of 3: rank 0 failed after step 5 ({injected}); relaunching from the checkpoint at step 3"
    ], log[-4000:]
    last = log.strip().splitlines()[-1]
    assert last == (
        f"error: rank 0 failed after step 5 ({injected}); not restarting: the attempt before failed "
        "the same way after the same step (a bug to fix, not a flaky host)"
    ), log[-3000:]

    st = status(run)
    assert (st["state"], st["step"]) == ("failed", 5)
    assert [(r["attempt"], r["step"], r["rank"]) for r in st["restarts"]] == [(1, 5, 0)]
    # the retry resumed at step 3 and its rows replaced the first attempt's
    assert [s for s, _ in train_losses(run)] == [1, 2, 3, 4, 5]


def test_no_restart_when_they_are_off(tiny, tmp_path):
    run = tmp_path / "run"
    rc, log = launch(
        run,
        [*tiny["overrides"], *RESTART_BASE, "launcher.num_processes=1", "launcher.max_restarts=0", "train.max_steps=3"],
        env=inject.env(FAIL_AFTER_STEP="1"),
    )
    assert rc == 1, log[-4000:]
    assert "restart 1" not in log and "error: training exited with code 1" in log, log[-3000:]
    assert status(run)["state"] == "running"


def test_a_node_ends_its_launch_at_once_when_another_node_failed():
    """Over NCCL, ranks whose peer died can hang in a collective until its timeout: the launcher does not wait."""
    polls = []
    t0 = time.monotonic()
    outcome = supervise(
        [sys.executable, "-c", "import time; time.sleep(300)"],
        dict(os.environ),
        abort=lambda: polls.append(time.monotonic()) or len(polls) >= 3,
    )
    assert outcome.aborted and outcome.returncode == -9
    assert time.monotonic() - t0 < 30 and len(polls) == 3
