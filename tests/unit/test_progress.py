"""Progress without a terminal: plain lines (Slurm logs, CI, nohup), not carriage-return bar fragments."""

from __future__ import annotations

from lora_launch.train.metrics import progress_line


def test_progress_line_has_step_loss_lr_speed_and_eta():
    row = {"step": 40, "loss": 1.23456, "lr": 2e-3, "tokens_per_s": 1234.4}
    line = progress_line(row, total=100, start_step=0, elapsed=20.0)
    assert line == "step 40/100 (40%) loss 1.2346 lr 2.00e-03 1234 tok/s eta 0m30s"
    assert "\r" not in line
    # a resumed run's ETA counts only the steps this attempt trained
    assert progress_line(row, total=100, start_step=30, elapsed=20.0).endswith("eta 2m00s")
