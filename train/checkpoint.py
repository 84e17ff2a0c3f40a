"""Periodic checkpoints and resume: the one place that decides what is saved and what is loaded.

Interface used by the loop: `due(step)`, `save(step, state)`, `load_latest() -> state | None`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class Checkpointer:
    def __init__(self, cfg: DictConfig, run_dir: Path, accelerator):
        self.every = cfg.checkpoint.every_steps
        self.keep_last = cfg.checkpoint.keep_last
        self.dir = run_dir / "checkpoints"
        self.accelerator = accelerator

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after optimizer step `step`."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: dict) -> None:
        raise NotImplementedError("checkpoint.every_steps > 0: periodic checkpoints are not implemented yet")

    def load_latest(self) -> dict | None:
        """The newest complete checkpoint's state, or None to start fresh."""
        return None
