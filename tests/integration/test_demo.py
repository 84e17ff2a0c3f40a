"""The embedded default job: `lora-launch` with no overrides learns its task on CPU, offline."""

from __future__ import annotations

import pytest

from support.cli import lora_launch, read_jsonl

pytestmark = pytest.mark.slow


def test_default_job_halves_its_eval_loss_and_answers(tmp_path):
    run = tmp_path / "run"
    result = lora_launch(f"run.dir={run}", "logging.progress_bar=false", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] <= 0.5 * evals[0], evals
    # the shipped base model never saw a question; the LoRA teaches it to answer them
    assert (run / "sample.txt").read_text().strip() == "[INST] Where is Italy? [/INST] Italy is in Europe."
