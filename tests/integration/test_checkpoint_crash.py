"""A save killed at each phase of the commit leaves a loadable checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.cli import TESTS, subprocess_env

from lora_launch.train.checkpoint import CRASH_ENV
from support.ckpt import Training, checkpointer


CRASHING_SAVE = """
import sys
sys.path.insert(0, {tests!r})
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
    code = CRASHING_SAVE.format(tests=str(TESTS), run=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env={**subprocess_env(), CRASH_ENV: f"{phase}@2"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # died by SIGKILL inside the save of step 2
    assert "not reached" not in proc.stdout
    resumed = Training(seed=3)
    assert checkpointer(tmp_path, resumed).load() == loadable  # and it loads into a model
    assert resumed.progress.step == loadable
