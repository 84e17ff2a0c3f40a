"""Markers by folder (unit, integration, distributed) and the session's tiny model fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.tiny import make_tiny

TIERS = ("unit", "integration", "distributed")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier, from the folder it lives in."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of a tiny random Llama (model dir with tokenizer) and a 400-row 'reverse words' jsonl."""
    model_dir, data = make_tiny(tmp_path_factory.mktemp("tiny"))
    return {
        "model": model_dir,
        "data": data,
        "overrides": [
            f"model.path={model_dir}",
            f"data.path={data}",
            "data.source=local",
            "train.seq_len=64",
            "logging.progress_bar=false",
            "sample.max_new_tokens=8",
        ],
    }
