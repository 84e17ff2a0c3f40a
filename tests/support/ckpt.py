"""A checkpointer on one process with a tiny model, as the training loop builds them (unit and crash tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from lora_launch.train.checkpoint import Checkpointer


class OneProcess:
    """The part of accelerate's Accelerator the checkpointer uses, for a single process."""
    process_index, num_processes, is_main_process, scaler = 0, 1, True, None

    def wait_for_everyone(self):
        pass


def make_cfg(run_dir: Path, mode: str = "auto", allow=(), lr: float = 0.1, r: int = 4):
    return OmegaConf.create({"run": {"dir": str(run_dir)}, "checkpoint": {"every_steps": 1, "keep_last": 2},
                             "resume": {"mode": mode, "allow_changes": list(allow)},
                             "optim": {"lr": lr}, "lora": {"r": r}})


def make_training(seed: int = 0, lr: float = 0.1):
    """A tiny model with a frozen part, AdamW and a warmup+decay LambdaLR, as the loop builds them."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9 ** s)
    return model, opt, sched


def train_steps(model, opt, sched, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses


FINGERPRINTS = {"data": "d", "tokenizer": "t", "model": {"hidden_size": 4}, "lora_shapes": {}}


def checkpointer(run_dir: Path, **kw) -> Checkpointer:
    ck = Checkpointer(make_cfg(run_dir, **kw), run_dir, OneProcess())
    ck.fingerprints = FINGERPRINTS
    return ck


def save(ck: Checkpointer, step: int, model, opt, sched) -> Path:
    return ck.save(step, {"model": model, "optimizer": opt, "scheduler": sched, "position": step * 8,
                          "tokens_seen": step * 100, "train_size": 20})
