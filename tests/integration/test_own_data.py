"""A user's own data on the bundled tiny model: every byte is known to its tokenizer, and a short run
answers on the data's topic."""

from __future__ import annotations

import re

import pytest

from support.cli import lora_launch
from support.own_data import content_words, own_pairs, write_chat

pytestmark = pytest.mark.slow


def test_own_chat_records_train_with_no_unknown_tokens_and_answer_on_topic(tmp_path):
    data = write_chat(tmp_path / "chat.jsonl")  # 50 records on cooking and pets
    # as a user runs it: from their own directory, the file named relative to it
    result = lora_launch(
        "data=local",
        "data.path=chat.jsonl",
        "train.max_steps=200",
        "sample.prompt=How do I cook rice?",
        f"run.dir={tmp_path / 'run'}",
        "logging.progress_bar=false",
        cwd=data.parent,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = re.search(r"data \[train\] .*: 50 records.*; ([\d.]+)% unknown tokens", result.stdout)
    assert report and report.group(1) == "0.00", result.stdout
    assert "unknown to the tokenizer" not in result.stdout
    sample = re.search(r"\[/INST\](.*)", (tmp_path / "run" / "sample.txt").read_text(), re.S).group(1)
    answers = set().union(*(content_words(a) for _, a in own_pairs()))
    assert content_words(sample) & answers, sample
