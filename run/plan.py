"""The run plan: everything derived from the config and the launch's shape, computed in one place.

Preview, the pre-launch checks, the generated accelerate/DeepSpeed files and the Trainer all read
the same `RunPlan`, so the global batch, the step count, the precision and the compile mode can
never disagree between what was previewed, what was written and what trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

from lora_launch.conf.dtypes import FLOATS, compute_precision, weight_dtype
from lora_launch.strategies import strategy_for


def shape_from_env() -> tuple[int, int]:
    """(nodes, processes per node) of the running launch, from WORLD_SIZE / LOCAL_WORLD_SIZE (1, 1 alone)."""
    import os

    world = int(os.environ.get("WORLD_SIZE") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    return max(1, world // max(local, 1)), local


def on_gpu_here() -> bool:
    """Whether this process sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def _bf16_here() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class RunPlan:
    """The launch's shape and the values derived from the config on the hardware it runs on."""

    num_machines: int
    procs_per_node: int
    micro_batch_size: int
    grad_accum: int
    precision: str  # compute precision: bfloat16 | float16 | float32
    model_dtype: str  # dtype the frozen base weights are held in
    strategy: str  # ddp | deepspeed | fsdp2
    zero_stage: int
    shards_params: bool  # each rank holds only a shard of the weights (ZeRO-3, FSDP2): forwards are collectives
    compile: str  # layers | loss | none
    max_steps: int
    epochs: float
    on_gpu: bool

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        num_machines: int,
        procs_per_node: int,
        on_gpu: bool | None = None,
        bf16: bool | None = None,
    ) -> RunPlan:
        """The plan for `cfg` on num_machines x procs_per_node processes.

        on_gpu / bf16 default to what this process sees; a preview or submission for other
        hardware passes them (e.g. a Slurm job with GPUs, previewed on a CPU login node).
        """
        on_gpu = on_gpu_here() if on_gpu is None else on_gpu
        bf16 = (_bf16_here() if on_gpu_here() else on_gpu) if bf16 is None else bf16
        t, d = cfg.train, cfg.distributed
        precision = compute_precision(str(t.precision), bf16=on_gpu and bf16)
        model_dtype = weight_dtype(str(cfg.model.dtype), precision)
        return cls(
            num_machines=num_machines,
            procs_per_node=procs_per_node,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
            precision=precision,
            model_dtype=model_dtype,
            strategy=str(d.strategy),
            zero_stage=int(d.zero_stage),
            shards_params=strategy_for(cfg).shards_weights(cfg),
            compile=_compile_mode(str(t.compile), on_gpu, cfg),
            max_steps=t.max_steps,
            epochs=t.epochs,
            on_gpu=on_gpu,
        )

    @classmethod
    def for_this_process(cls, cfg: DictConfig) -> RunPlan:
        """The plan as a rank sees it: the launch's shape from the variables torchrun/accelerate set."""
        return cls.from_config(cfg, *shape_from_env())

    @property
    def world_size(self) -> int:
        return self.num_machines * self.procs_per_node

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: micro x accum x world."""
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def mixed_precision(self) -> str:
        """accelerate's mixed_precision value (and the DeepSpeed JSON's bf16/fp16 switch)."""
        return FLOATS[self.precision].mixed_precision

    def steps_per_epoch(self, train_samples: int) -> int:
        return math.ceil(train_samples / self.global_batch)

    def total_steps(self, train_samples: int) -> int:
        """Optimizer steps of the run: train.max_steps, or enough for train.epochs over the data."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.epochs * train_samples / self.global_batch))


def warmup_steps(optim: DictConfig, total_steps: int) -> int:
    """Steps of the learning rate's warm-up: optim.warmup_steps, else optim.warmup_ratio of the run's steps."""
    return optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps)


def _compile_mode(mode: str, on_gpu: bool, cfg: DictConfig) -> str:
    """What train.compile means here: `auto` is `layers` on GPUs (unless the strategy's sharded weights keep
    dynamo from tracing them: `loss` under ZeRO-3) and `none` on CPU."""
    if mode != "auto":
        return mode
    if not on_gpu:
        return "none"
    return strategy_for(cfg).compile_on_gpu(cfg)
