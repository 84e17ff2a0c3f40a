"""A save killed at each phase of the commit leaves a loadable checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.cli import TESTS, subprocess_env

from lora_launch.train.checkpoint import CRASH_ENV
from support.ckpt import checkpointer, make_training


CRASHING_SAVE = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from support.ckpt import checkpointer, make_training, save, train_steps
model, opt, sched = make_training()
ck = checkpointer(Path({run!r}))
for step in (1, 2):
    train_steps(model, opt, sched, 1)
    save(ck, step, model, opt, sched)
print("not reached")
"""


@pytest.mark.parametrize("phase, loadable", [("after_rank_write", 1), ("before_commit", 1), ("after_commit", 2)])
def test_crash_inside_save_leaves_a_loadable_checkpoint(tmp_path, phase, loadable):
    code = CRASHING_SAVE.format(tests=str(TESTS), run=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env={**subprocess_env(), CRASH_ENV: f"{phase}@2"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # died by SIGKILL inside the save of step 2
    assert "not reached" not in proc.stdout
    loaded = checkpointer(tmp_path).load_latest()
    assert loaded["state"]["step"] == loadable
    model, opt, sched = make_training(seed=3)
    checkpointer(tmp_path).restore(loaded, model, opt, sched)  # and it loads into a model
