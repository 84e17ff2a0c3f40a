"""`pytest -n N --dist loadgroup` by the tests' xdist_group marks, whatever the installed pytest.

pytest-xdist 3.8 tells its scheduler a test's group by appending it to the test's id, which pytest 9.2 no longer
lets a plugin change (pytest-dev/pytest-xdist#1386): every test would be scheduled alone, two-rank runs on both
workers at once. Here each worker writes the groups it collected to a folder the controller named, and the
scheduler reads them once every worker has collected (before it splits the collection into work units)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

FOLDER = "lora_launch_test_groups"  # the workerinput key naming the folder
_folder_key = pytest.StashKey[str]()


def groups_folder(config: pytest.Config) -> str:
    """The controller's folder for the workers' groups, made on first use."""
    if _folder_key not in config.stash:
        config.stash[_folder_key] = tempfile.mkdtemp(prefix="xdist-groups-")
    return config.stash[_folder_key]


def remove_groups_folder(config: pytest.Config) -> None:
    if _folder_key in config.stash:
        shutil.rmtree(config.stash[_folder_key], ignore_errors=True)


def write_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker: {test id: group} of the tests marked xdist_group, for the controller's scheduler."""
    worker = getattr(config, "workerinput", None)
    if not worker or FOLDER not in worker:
        return
    groups = {}
    for item in items:
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        if names:
            groups[item.nodeid] = "_".join(names)
    path = Path(worker[FOLDER]) / f"{worker['workerid']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, path)


def make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduler with a test's scope its group (a test of none is a scope of its own), taken in
    collection order: the distributed tier's group, the longest, starts first."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def __init__(self, config, log):
            super().__init__(config, log)
            self.groups: dict[str, str] = {}
            config.option.loadscopereorder = False

        def _split_scope(self, nodeid: str) -> str:
            if not self.groups:  # every worker has collected (and written) by the time scopes are split
                for path in Path(groups_folder(self.config)).glob("*.json"):
                    self.groups.update(json.loads(path.read_text()))
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)
