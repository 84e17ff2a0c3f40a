"""`lora-launch ... | head -1`: the installed console script ends quietly when its reader goes away, exit 1
and nothing on stderr (no BrokenPipeError traceback), the way Unix tools do."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from support.cli import CLI, into_closed_pipe, subprocess_env

# `runs` prints one line a run: this many runs print well over a pipe's 64 KiB, so `head -1` is gone
# while lora-launch still writes, whatever the timing
MANY_RUNS = 1000


def piped(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`sh -c command` as a user types it, with the installed lora-launch on PATH."""
    env = subprocess_env(PATH=f"{Path(CLI).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def many_runs(tmp_path) -> Path:
    for i in range(MANY_RUNS):
        run = tmp_path / "runs" / f"run-{i:04d}"
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"state": "finished", "step": 4, "time": 1.0}))
    return tmp_path


def test_help_into_head(tmp_path):
    # the help fits in a pipe's buffer, so this fails only when head exits before lora-launch has written
    # it all; test_closed_stdout_exits_1_quietly checks the same without the race
    out = piped("lora-launch --help | head -1", tmp_path)
    assert out.stdout.startswith("usage: lora-launch") and out.stdout.count("\n") == 1, out.stdout
    assert out.stderr == "", out.stderr


def test_runs_into_head(many_runs):
    out = piped("lora-launch runs | head -1", many_runs)
    assert out.stdout.split()[:2] == ["name", "status"], out.stdout
    assert out.stderr == "", out.stderr


@pytest.mark.parametrize(
    "args",
    [("--help",), ("runs",), ("generate", "--help"), ("preview=true",)],
    ids=["help", "runs", "command-help", "preview"],
)
def test_closed_stdout_exits_1_quietly(many_runs, args):
    rc, err = into_closed_pipe(*args, cwd=many_runs)
    assert (rc, err) == (1, ""), f"lora-launch {' '.join(args)}: exit {rc}, stderr:\n{err}"
    assert len(list((many_runs / "runs").iterdir())) == MANY_RUNS, "a preview left its run dir behind"
