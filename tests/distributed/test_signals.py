"""Ctrl-C, and a SIGKILL to the launcher alone, with two ranks (ddp and fsdp2): both stop after the same step,
one checkpoint, and the re-run's losses equal an uninterrupted run's bit for bit (gloo on CPU)."""

from __future__ import annotations

import signal

import pytest

from support.cli import lora_launch
from support.resume import committed_steps, reference, status, train_losses, under, wait_for_step
from support.terminal import ctrl_c, gone_within, start_job, wait_for_ranks

pytestmark = pytest.mark.slow


def _two_ranks_at_step_4(tiny, tmp_path_factory, tmp_path, strategy: str):
    """An uninterrupted reference run's losses (shared with test_resume), then the same run started as a
    terminal's job and trained past step 4: (args, reference losses, run dir, log, job, ranks)."""
    own = under(strategy)
    args = [*tiny["overrides"], *own]
    ref = reference(tiny, tmp_path_factory.getbasetemp(), own)["train"]
    run, log = tmp_path / "run", tmp_path / "run.log"
    job = start_job([*args, f"run.dir={run}"], tmp_path, log)
    ranks = wait_for_ranks(job, 2)
    wait_for_step(run, job, 4)
    return args, ref, run, log, job, ranks


def _one_checkpoint_and_the_rerun_matches(tmp_path, args, ref_losses, run) -> None:
    st = status(run)
    assert st["state"] == "preempted", st
    assert committed_steps(run)[-1] == st["step"]
    result = lora_launch(*args, f"run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(run) == ref_losses


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ctrl_c_with_two_ranks_checkpoints_once_and_resumes_bit_for_bit(tiny, tmp_path_factory, tmp_path, strategy):
    args, ref, run, log, job, ranks = _two_ranks_at_step_4(tiny, tmp_path_factory, tmp_path, strategy)
    ctrl_c(job)
    assert job.wait(timeout=180) == 130, log.read_text()[-3000:]
    assert gone_within(ranks, 10)
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert status(run)["signal"] == "SIGINT"
    _one_checkpoint_and_the_rerun_matches(tmp_path, args, ref, run)


def test_fsdp2_ranks_of_a_launcher_killed_alone_checkpoint_together_and_the_rerun_matches(
    tiny, tmp_path_factory, tmp_path
):
    """SIGKILL to the launcher alone (an OOM killer's or a user's `kill -9 PID`): both FSDP2 ranks find their
    parent gone, stop after the same step with one sharded checkpoint, and the re-run's losses equal an
    uninterrupted run's bit for bit."""
    args, ref, run, _, job, ranks = _two_ranks_at_step_4(tiny, tmp_path_factory, tmp_path, "fsdp2")
    job.send_signal(signal.SIGKILL)  # the launcher alone, not its group
    job.wait(timeout=30)
    assert gone_within(ranks, 120)
    _one_checkpoint_and_the_rerun_matches(tmp_path, args, ref, run)
