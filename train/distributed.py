"""The Accelerator for the configured strategy, and the few rank-aware helpers the loop uses."""

from __future__ import annotations

import os
import re
import sys
from datetime import timedelta

import torch
from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError
from lora_launch.run.own_configs import merged_deepspeed
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for, strategy_named


def make_accelerator(cfg: DictConfig, plan: RunPlan):
    """An Accelerator for DDP, DeepSpeed ZeRO or FSDP2, on GPUs (NCCL) or CPU (gloo). Under FSDP2 it is
    DDP's, and the model is sharded by `prepare` (train/fsdp.py says why).

    DeepSpeed on CPU needs ACCELERATE_USE_DEEPSPEED and DS_ACCELERATOR set before accelerate
    builds its state, and an explicit gloo backend: with `cpu=True` accelerate silently drops
    the DeepSpeed plugin, and without a backend every rank believes it is alone.
    """
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    on_gpu, world = plan.on_gpu, plan.world_size
    kwargs = dict(mixed_precision=plan.mixed_precision, gradient_accumulation_steps=cfg.train.grad_accum)
    backend = "gloo" if world > 1 and not on_gpu else None
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30))]
    strategy = strategy_for(cfg)
    for problem in strategy.launch_problems(cfg, plan):  # as the launcher checked, for ranks started by hand
        raise ConfigError(problem)
    ds = strategy.deepspeed_config(cfg, plan)
    if ds is not None:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # the run's DeepSpeed JSON with the user's own (distributed.deepspeed_config) laid under it, as the
        # launcher checked and wrote it to RUN/ds_config.json
        ds = merged_deepspeed(ds, cfg.distributed.deepspeed_config)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    elif not on_gpu:
        kwargs["cpu"] = True
    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} processes but {world} were launched; "
            "refusing to train with every rank thinking it is alone"
        )
    return accelerator


def prepare(accelerator, cfg: DictConfig, model, optimizer):
    """The model and optimizer ready to train: accelerate wraps both for DDP and DeepSpeed; under FSDP2 the
    model is sharded already (`lora_launch.train.fsdp.shard`) and accelerate wraps the optimizer alone."""
    if strategy_for(cfg).shards_model_itself:
        return model, accelerator.prepare(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    if getattr(model, "is_deepcompile_enabled", lambda: False)():
        # compile.deepcompile in the user's DeepSpeed JSON: DeepSpeed leaves it off until its engine compiles
        _deepcompile_arch_list()
        model.compile()
    return model, optimizer


def _deepcompile_arch_list() -> None:
    """DeepCompile builds its CUDA op on first use, for the architectures TORCH_CUDA_ARCH_LIST names, else for
    every visible GPU's. DeepSpeed 0.19.8 cannot read a name with a feature suffix such as "9.0a" (a ValueError
    deep in its builder, seen on an H100 whose environment set one): build for this GPU alone where the list is
    unset, and where it names such an architecture, for its base ("9.0a" -> "9.0", which the same GPUs run)."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not listed:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        return
    names = re.split(r"[;\s]+", listed)
    readable = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", name) for name in names]
    if readable != names:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(readable)
        print(
            f"DeepCompile: its op is built for TORCH_CUDA_ARCH_LIST={';'.join(readable)} (from {listed!r}: "
            "DeepSpeed cannot read architecture suffixes)",
            flush=True,
        )


def unwrapped(accelerator, model):
    """The model inside its DDP (or compiled) wrapper, as `accelerator.unwrap_model` gives it. accelerate imports
    DeepSpeed to ask whether the model is a DeepSpeedEngine whenever DeepSpeed is installed, seconds at every
    start; a run that never imported DeepSpeed holds no engine, so its wrappers are taken off without it."""
    from accelerate.utils import is_compiled_module
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel

    if "deepspeed" in sys.modules or is_compiled_module(model) or "_orig_mod" in vars(model):
        return accelerator.unwrap_model(model)
    while isinstance(model, (DistributedDataParallel, DataParallel, FullyShardedDataParallel)):
        model = model.module
    return model


def adapter_state_dict(accelerator, model) -> dict:
    """The model's state dict for the final PEFT adapter, with whole tensors (ZeRO-3 and FSDP2 gather their
    shards: every rank calls it)."""
    from lora_launch.train.fsdp import full_trainable_params, is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        return full_trainable_params(model)
    if "deepspeed" in sys.modules:
        return accelerator.get_state_dict(model)
    return accelerator.get_state_dict(unwrapped(accelerator, model), unwrap=False)


def all_sum(accelerator, *values: float) -> list[float]:
    """Sum plain numbers over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def device_sum(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over all ranks without waiting for it on the host (NCCL runs in stream order)."""
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t)
    return t


def what_runs(accelerator, plan: RunPlan) -> str:
    """The run's processes in words, from what accelerate set up (not only what the config asked):
    '1 process on the CPU', '8 processes on 8 GPUs, DeepSpeed ZeRO-3', '2 processes on the CPU across 2 nodes, DDP'."""
    n = accelerator.num_processes
    where = "on the CPU" if accelerator.device.type == "cpu" else f"on {n} GPU{'s' if n > 1 else ''}"
    if plan.num_machines > 1:
        where += f" across {plan.num_machines} nodes"
    how = strategy_named(plan.strategy).running(accelerator.distributed_type.name, n, plan)
    return f"{n} process{'es' if n > 1 else ''} {where}" + (f", {how}" if how else "")
