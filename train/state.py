"""What a restart needs, as small Stateful parts (torchtitan's `Stateful`): each captures one thing with
`state_dict()` and puts it back with `load_state_dict()`. The checkpointer is built with them and decides
where each goes on disk; ZeRO's partitions stay behind train/zero.py.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lora_launch.train.checkpoint import CheckpointError
from lora_launch.train.fsdp import Fsdp2Adapter, is_dtensor
from lora_launch.train.zero import DeepSpeedAdapter, TorchAdapter, full_shape, trainable


def adapter_for(optimizer) -> TorchAdapter:
    """The adapter for `optimizer` as accelerate prepared it: DeepSpeed's under ZeRO, FSDP2's for sharded
    (DTensor) parameters, plain torch otherwise."""
    chain = [optimizer]  # accelerate's wrapper -> (DeepSpeed's ZeRO optimizer ->) the torch optimizer
    while hasattr(chain[-1], "optimizer"):
        chain.append(chain[-1].optimizer)
    if any(is_dtensor(p) for group in chain[-1].param_groups for p in group["params"]):
        return Fsdp2Adapter(chain[-1])
    if "deepspeed" in sys.modules:  # never imported for a DDP run
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        for link in chain:
            if isinstance(link, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
                return DeepSpeedAdapter(link, chain[-1])
        if any(type(link).__module__.startswith("deepspeed.") for link in chain):
            raise NotImplementedError(f"checkpoints of DeepSpeed's {type(chain[1]).__name__} (only ZeRO 1-3)")
    return TorchAdapter(chain[-1])


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class TrainableState:
    """The trainable LoRA weights and their optimizer state, whole and by parameter name, so the saved form
    is the same whatever the world size or ZeRO stage.

    {"tensors": {"param/NAME": ..., "optim/KEY/NAME": ...}, "optimizer": {"keys": [...], "step": n}};
    both methods are collectives under ZeRO (every rank calls them).
    """

    def __init__(self, model, optimizer):
        self.model = model
        self.zero = adapter_for(optimizer)

    def state_dict(self, to_host=None) -> dict:
        """`to_host(key, tensor)` puts each tensor where the caller wants it (by default a copy on the CPU)."""
        tensors, optimizer = self.zero.full_trainable_state(self.model, to_host)
        return {"tensors": tensors, "optimizer": optimizer}

    @property
    def updater(self) -> torch.optim.Optimizer:
        """The torch optimizer whose step updates the weights and their state in place."""
        return self.zero.torch_optimizer

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        for name, p in trainable(self.model):
            saved = tensors.get(f"param/{name}")
            shape = None if saved is None else tuple(saved.shape)
            if shape != tuple(full_shape(p)):
                raise CheckpointError(f"LoRA shape of {name}: checkpoint {shape}, model {tuple(full_shape(p))}")
        self.zero.load_full_trainable_state(self.model, tensors, state["optimizer"])


class SchedulerState:
    """Where the LR schedule is. On load the base learning rates stay this run's, so an allowed optim.lr
    change rescales the rest of the schedule."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        scheduler = self.scheduler
        base = list(scheduler.base_lrs)
        scheduler.load_state_dict(dict(state))  # LambdaLR pops from the dict it is given
        scheduler.base_lrs = base
        lrs = [b * f(scheduler.last_epoch) for b, f in zip(base, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs


class RngState:
    """This rank's random number generators (dropout, data): python, numpy, torch CPU and CUDA.

    {"tensors": {"torch", "numpy", ["cuda"]}, "python": [...], "numpy": [...]}: numpy's key array is a
    tensor, the rest of its state JSON.
    """

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
        if torch.cuda.is_available():
            tensors["cuda"] = torch.cuda.get_rng_state()
        version, state, py_gauss = random.getstate()
        return {"tensors": tensors, "python": [version, list(state), py_gauss], "numpy": [kind, pos, has_gauss, gauss]}

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])
        kind, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, py_state, py_gauss = state["python"]
        random.setstate((version, tuple(py_state), py_gauss))


@dataclass
class Progress:
    """How far training got: optimizer steps, the global sample index the data continues at (the same
    whatever the world size), and tokens seen."""

    train_size: int
    step: int = 0
    position: int = 0
    tokens_seen: int = 0

    @property
    def epoch(self) -> int:
        return self.position // self.train_size

    def state_dict(self) -> dict:
        return {"step": self.step, "position": self.position, "tokens_seen": self.tokens_seen, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.position, self.tokens_seen = state["step"], state["position"], state["tokens_seen"]


class ScalerState:
    """The loss scale of mixed precision: torch's GradScaler ("torch") or DeepSpeed's loss scaler ("deepspeed")."""

    def __init__(self, kind: str, scaler):
        self.kind, self.scaler = kind, scaler

    def state_dict(self) -> dict:
        return {self.kind: self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.kind in state:  # a checkpoint from another precision setup keeps this run's scale
            self.scaler.load_state_dict(state[self.kind])


def scaler_state(accelerator, optimizer) -> ScalerState | None:
    """The ScalerState of this run, or None where there is no loss scaler."""
    if getattr(accelerator, "scaler", None) is not None:
        return ScalerState("torch", accelerator.scaler)
    deepspeed_scaler = adapter_for(optimizer).loss_scaler()
    return ScalerState("deepspeed", deepspeed_scaler) if deepspeed_scaler is not None else None
