"""Test-side fault injection: `env(...)` puts this folder's sitecustomize on a run's PYTHONPATH."""

from __future__ import annotations

from pathlib import Path

HERE = str(Path(__file__).resolve().parent)


def env(**faults: str) -> dict:
    """Environment for a launch whose processes load this folder's sitecustomize with `faults` set."""
    return {"PYTHONPATH": HERE, **faults}
