"""Markers by folder (unit, integration, distributed), the groups that keep tests on one xdist worker, and the
session's tiny model fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import groups
from support.tiny import make_tiny

TIERS = ("unit", "integration", "distributed")
# `make test` runs on three workers (pytest -n 3 --dist loadgroup). Runs of two ranks or more take turns on one
# worker, the distributed tier's with the tests marked two_ranks elsewhere: two at once would put four ranks on
# the CI machine's two cores
TWO_RANKS = "two-ranks"


def _xdist_group(item, tier: str) -> str | None:
    """The worker group of a test: two-rank runs share one; the tests of a module that share a fixture of
    module scope (one trained run, one server) share their module's, so that it is built once."""
    if tier == "distributed" or item.get_closest_marker("two_ranks"):
        return TWO_RANKS
    defs = getattr(item, "_fixtureinfo", None)
    scopes = {d.scope for ds in (defs.name2fixturedefs.values() if defs else ()) for d in ds}
    return item.module.__name__ if scopes & {"module", "class", "package"} else None


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier, from the folder it lives in, and its worker group."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        group = _xdist_group(item, tier)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    groups.write_groups(config, items)


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup by the groups above (support/groups.py says why not xdist's own)."""
    return groups.make_scheduler(config, log) if config.getvalue("dist") == "loadgroup" else None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput[groups.FOLDER] = groups.groups_folder(node.config)


def pytest_unconfigure(config):
    groups.remove_groups_folder(config)


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
