"""A save killed at each phase of the commit leaves a loadable checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import inject
from support.ckpt import Training, checkpointer
from support.cli import TESTS, subprocess_env

CRASHING_SAVE = """
from pathlib import Path
from support.ckpt import Training, checkpointer
training = Training()
ck = checkpointer(Path({run!r}), training)
for step in (1, 2):
    training.steps(1)
    ck.maybe_save(step)
print("not reached")
"""


@pytest.mark.parametrize("phase, loadable", [("after_rank_write", 1), ("before_commit", 1), ("after_commit", 2)])
def test_crash_inside_save_leaves_a_loadable_checkpoint(tmp_path, phase, loadable):
    env = subprocess_env(**inject.env(CRASH_IN_SAVE=f"{phase}@2"))
    env["PYTHONPATH"] += os.pathsep + str(TESTS)  # the child imports support.ckpt
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVE.format(run=str(tmp_path))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr  # died by SIGKILL inside the save of step 2
    assert "not reached" not in proc.stdout
    resumed = Training(seed=3)
    assert checkpointer(tmp_path, resumed).load() == loadable  # and it loads into a model
    assert resumed.progress.step == loadable
