"""The installed `lora-launch` console script, run in a fresh process as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
# the console script pip installed next to this interpreter: the path users take, not `-m` or `-c`
CLI = str(Path(sys.executable).with_name("lora-launch"))


def subprocess_env(**extra: str) -> dict:
    """This environment, offline and quiet; nothing points Python at the repository, and no terminal size is
    passed on (pytest-xdist's workers set COLUMNS and LINES): output into a pipe, unless `extra` names one."""
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def lora_launch(
    *overrides: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `lora-launch` with `overrides` and capture its output."""
    return subprocess.run(
        [CLI, *overrides], cwd=cwd, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def into_closed_pipe(*args: str, cwd: Path) -> tuple[int, str]:
    """Run lora-launch with its stdout a pipe whose reader is already gone; its exit status and stderr."""
    proc = subprocess.Popen(
        [CLI, *args], cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()  # long before the new interpreter prints anything
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
