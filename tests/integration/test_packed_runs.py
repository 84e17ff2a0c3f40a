"""Packed training through the installed `lora-launch`: rows packed best-fit-decreasing, stopped with SIGTERM and
resumed to losses bitwise equal to an uninterrupted run; a bad packing strategy is one line before launch."""

from __future__ import annotations

import json

from support.cli import lora_launch
from support.resume import stopped_and_resumed_equals_uninterrupted

SHORT = [
    "train.micro_batch_size=2",
    "train.grad_accum=2",
    "data.max_samples=40",
    "train.max_steps=8",
    "checkpoint.every_steps=2",
    "logging.tensorboard=false",
    "sample.max_new_tokens=4",
    "eval.at_start=false",
    "lora.dropout=0.1",
    "launcher.max_restarts=0",
    "data.packing=true",
]


def test_packed_run_resumes_exactly(tiny, tmp_path):
    args = [*tiny["overrides"], *SHORT]
    log = stopped_and_resumed_equals_uninterrupted(tmp_path, args)
    assert "samples packed by bfd" in log, log[-3000:]
    report = json.loads((tmp_path / "reference" / "data_report.json").read_text())
    kept = report["sources"]["train"]["ok"] + report["sources"]["train"]["truncated"]
    assert report["packing_strategy"] == "bfd" and report["train_samples_packed"] == kept - report["val_samples"]


def test_unknown_packing_strategy_is_one_line(tiny, tmp_path):
    refused = lora_launch(
        *tiny["overrides"],
        f"run.dir={tmp_path / 'r'}",
        "data.packing=true",
        "data.packing_strategy=first_fit",
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and "data.packing_strategy" in refused.stderr, refused.stderr[-2000:]
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
