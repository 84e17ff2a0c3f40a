"""Ctrl-C with two ranks: both stop after the same step, one checkpoint, and the re-run's losses equal an
uninterrupted run's bit for bit (gloo on CPU)."""

from __future__ import annotations

import pytest

from support.cli import lora_launch
from support.resume import BASE, committed_steps, status, train_losses, wait_for_step
from support.terminal import ctrl_c, gone_within, start_job, wait_for_ranks

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("strategy", ["ddp"])
def test_ctrl_c_with_two_ranks_checkpoints_once_and_resumes_bit_for_bit(tiny, tmp_path, strategy):
    args = [*tiny["overrides"], *BASE, f"distributed={strategy}", "launcher.num_processes=2"]
    ref = tmp_path / "reference"
    result = lora_launch(*args, f"run.dir={ref}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run, log = tmp_path / "run", tmp_path / "run.log"
    job = start_job([*args, f"run.dir={run}"], tmp_path, log)
    ranks = wait_for_ranks(job, 2)
    wait_for_step(run, job, 4)
    ctrl_c(job)
    assert job.wait(timeout=180) == 130, log.read_text()[-3000:]
    assert gone_within(ranks, 10)
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    st = status(run)
    assert st["state"] == "preempted" and st["signal"] == "SIGINT"
    assert committed_steps(run)[-1] == st["step"]

    result = lora_launch(*args, f"run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(run) == train_losses(ref)
