"""A checkpointer on one process with a tiny model and the states the training loop gives it (unit and crash
tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lora_launch.train.checkpoint import Checkpointer
from lora_launch.train.state import Progress, RngState, SchedulerState, TrainableState

FINGERPRINTS = {"data": "d", "tokenizer": "t", "model": {"hidden_size": 4}, "lora_shapes": {}}
SAMPLES_PER_STEP, TOKENS_PER_STEP, TRAIN_SIZE = 8, 100, 20


class OneProcess:
    """The part of accelerate's Accelerator the checkpointer uses, for a single process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def make_cfg(
    run_dir: Path,
    mode: str = "auto",
    allow=(),
    lr: float = 0.1,
    r: int = 4,
    every: int = 1,
    background_min_mib: int = 64,
):
    return OmegaConf.create(
        {
            "run": {"dir": str(run_dir)},
            "checkpoint": {
                "every_steps": every,
                "keep_last": 2,
                "background": True,
                "background_min_mib": background_min_mib,
            },
            "resume": {"mode": mode, "allow_changes": list(allow)},
            "optim": {"lr": lr},
            "lora": {"r": r},
        }
    )


class Training:
    """A tiny model with a frozen part, AdamW, a warmup+decay LambdaLR and the states a checkpoint holds, as
    the loop builds them; each step draws data and dropout from the global RNGs."""

    def __init__(self, seed: int = 0, lr: float = 0.1):
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3), torch.nn.Linear(4, 1))
        self.model[0].weight.requires_grad_(False)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 3) * 0.9**s)
        self.progress = Progress(train_size=TRAIN_SIZE)
        self.states = {
            "trainable": TrainableState(self.model, self.optimizer),
            "scheduler": SchedulerState(self.scheduler),
            "rng": RngState(),
            "progress": self.progress,
        }

    def steps(self, n: int) -> list[float]:
        """Train n optimizer steps; returns their losses."""
        losses = []
        for _ in range(n):
            loss = self.model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            self.progress.step += 1
            self.progress.position += SAMPLES_PER_STEP
            self.progress.tokens_seen += TOKENS_PER_STEP
            losses.append(loss.item())
        return losses


def checkpointer(
    run_dir: Path, training: Training | None = None, fingerprints: dict = FINGERPRINTS, **cfg
) -> Checkpointer:
    """A Checkpointer of `training`'s states (a fresh Training when None) in run_dir."""
    states = (training or Training(seed=7)).states
    return Checkpointer(make_cfg(run_dir, **cfg), run_dir, OneProcess(), states=states, fingerprints=fingerprints)


def edit_manifest(path: Path, edit) -> None:
    """Rewrite checkpoint `path`'s manifest.json as `edit(manifest)` leaves it (in place)."""
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def saved_steps(run_dir: Path, steps) -> list[Path]:
    """Train one step before each of `steps` and save it; the checkpoints' directories (keep_last is 2)."""
    t = Training()
    ck = checkpointer(run_dir, t)
    paths = []
    for step in steps:
        t.steps(1)
        paths.append(ck.save(step))
    return paths
