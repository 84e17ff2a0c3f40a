"""The run plan: everything derived from the config and the launch's shape, computed in one place.

Preview, the pre-launch checks, the generated accelerate/DeepSpeed files and the Trainer all read
the same `RunPlan`, so the global batch, the step count, the precision and the compile mode can
never disagree between what was previewed, what was written and what trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig

# train.precision / model.dtype use torch's names; `auto` is decided here
_DTYPES = ("bfloat16", "float16", "float32")
# torch dtype name -> accelerate's mixed_precision
_MIXED = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


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
    compile: str  # layers | loss | none
    max_steps: int
    epochs: float
    on_gpu: bool

    @classmethod
    def from_config(cls, cfg: DictConfig, num_machines: int, procs_per_node: int,
                    on_gpu: bool | None = None, bf16: bool | None = None) -> "RunPlan":
        """The plan for `cfg` on num_machines x procs_per_node processes.

        on_gpu / bf16 default to what this process sees; a preview or submission for other
        hardware passes them (e.g. a Slurm job with GPUs, previewed on a CPU login node).
        """
        on_gpu = on_gpu_here() if on_gpu is None else on_gpu
        bf16 = (_bf16_here() if on_gpu_here() else on_gpu) if bf16 is None else bf16
        t, d = cfg.train, cfg.distributed
        precision = str(t.precision)
        if precision not in _DTYPES:  # auto
            precision = "bfloat16" if on_gpu and bf16 else "float32"
        model_dtype = str(cfg.model.dtype)
        if model_dtype not in _DTYPES:  # auto: follow the precision
            model_dtype = "bfloat16" if precision == "bfloat16" else "float32"
        return cls(num_machines=num_machines, procs_per_node=procs_per_node,
                   micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, precision=precision,
                   model_dtype=model_dtype, strategy=str(d.strategy), zero_stage=int(d.zero_stage),
                   compile=_compile_mode(str(t.compile), on_gpu, str(d.strategy), int(d.zero_stage)),
                   max_steps=t.max_steps, epochs=t.epochs, on_gpu=on_gpu)

    @classmethod
    def for_this_process(cls, cfg: DictConfig) -> "RunPlan":
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
    def shards_params(self) -> bool:
        """Whether each rank holds only a shard of the weights (ZeRO-3, FSDP2): forwards are collectives."""
        return self.zero_stage == 3 or self.strategy == "fsdp2"

    @property
    def mixed_precision(self) -> str:
        """accelerate's mixed_precision value (and the DeepSpeed JSON's bf16/fp16 switch)."""
        return _MIXED[self.precision]

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


def deepspeed_config(cfg: DictConfig, plan: RunPlan) -> dict:
    """DeepSpeed JSON for distributed.zero_stage, with batch sizes, precision and clipping from the plan."""
    d, t = cfg.distributed, cfg.train
    zero: dict = {"stage": d.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": 5e7}
    if d.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,
                     "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5})
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": float(cfg.optim.max_grad_norm),
        "bf16": {"enabled": plan.precision == "bfloat16"},
        "fp16": {"enabled": plan.precision == "float16"},
        "zero_optimization": zero,
        # the loop brings its own torch AdamW (LoRA params are few); DeepSpeed must accept it
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def loads_from_rank0(cfg: DictConfig, plan: RunPlan) -> bool:
    """Whether rank 0 alone reads the base weights and sends each rank its shards: FSDP2 over several
    processes with a bf16/fp32 base. A 4-bit base is small enough that every rank loads its own (quantised
    as it loads); a single process builds it where it trains."""
    return cfg.distributed.strategy == "fsdp2" and cfg.quant.mode != "nf4" and plan.world_size > 1


def fsdp2_mesh(cfg: DictConfig, plan: RunPlan) -> tuple[int, int]:
    """(copies, ranks per copy) under distributed=fsdp2: `distributed.replicate` copies of the model, each
    sharded over world / copies ranks ("auto": one copy per node when several nodes of several processes run,
    else one in all: a node of one process would hold a whole copy, unsharded)."""
    from lora_launch.conf.schema import ConfigError

    r, world = cfg.distributed.replicate, plan.world_size
    if r == "auto":
        copies = plan.num_machines if plan.num_machines > 1 and plan.procs_per_node > 1 else 1
    else:
        copies = int(r)
    if world % copies:
        raise ConfigError(f"distributed.replicate={copies} does not divide the world size {world} "
                          f"({plan.num_machines} nodes x {plan.procs_per_node} processes); set a divisor of "
                          f"{world}, or distributed.replicate=auto")
    return copies, world // copies


GROUP_BYTES = 2 * 2**30  # distributed.layers_per_group=auto: the most weight bytes in a group of several layers
GROUP_LAYERS = 4  # and the most layers in one


def layers_per_group(setting, layer_bytes: float) -> int:
    """Decoder layers in each FSDP2 shard group: `setting` (distributed.layers_per_group) when it is a number;
    for "auto", as many layers of `layer_bytes` (one layer's weights as stored) as fit GROUP_BYTES, from 1 to
    GROUP_LAYERS. On one H200 (7B in bf16, 2026-11-29) groups of 2 to 8 layers ran at 0.77-0.79 of ddp's
    speed at world size 1, one layer a group at 0.59: each group's hooks and gathers cost host time."""
    if setting != "auto":
        return int(setting)
    return max(1, min(GROUP_LAYERS, int(GROUP_BYTES // max(layer_bytes, 1.0))))


def fsdp2_config(cfg: DictConfig, plan: RunPlan) -> dict:
    """What every rank applies under distributed=fsdp2 (torch's fully_shard), from the config and the plan;
    RUN/fsdp2.json shows it.

    One shard group per `distributed.layers_per_group` consecutive decoder layers (the classes the model names
    in `_no_split_modules`), the rest of the causal LM (embeddings, final norm, output head) in the root group.
    Parameters keep their dtypes (the frozen base in the plan's weight dtype, the LoRA adapters in float32):
    the all-gathers move the base weights as stored, 4-bit packed ones included, and compute runs under
    autocast in the plan's precision, as it does under DDP; gradients are reduced in float32. With several
    copies (`fsdp2_mesh`) the mesh is 2-D, (replicate, shard): torch's hybrid sharding.
    """
    offload = bool(cfg.distributed.offload_params)
    copies, per_copy = fsdp2_mesh(cfg, plan)
    return {
        "fsdp_version": 2,
        "mesh": {"device_type": "cuda" if plan.on_gpu else "cpu",
                 **({"shape": [copies, per_copy], "dim_names": ["replicate", "shard"]} if copies > 1
                    else {"shape": [plan.world_size]})},
        "shard": "decoder layers (the model's _no_split_modules), layers_per_group to a group, then the causal LM "
                 "as the root",
        "reshard_after_forward": bool(cfg.distributed.reshard_after_forward),
        # the last N groups not resharded after forward; auto: decided after the first step (the log says)
        "keep_gathered": cfg.distributed.keep_gathered if cfg.distributed.reshard_after_forward else "all",
        "layers_per_group": cfg.distributed.layers_per_group,  # auto: see layers_per_group(); the log says
        "prefetch": cfg.distributed.prefetch,  # null: FSDP2's own (one group ahead)
        "mixed_precision": {"param_dtype": None, "reduce_dtype": "float32",
                            "autocast": None if plan.precision == "float32" else plan.precision},
        "offload": {"params": offload, "gradients": offload, "optimizer_step": offload,
                    "pin_memory": offload and plan.on_gpu},
        "compile": plan.compile,
    }


def _compile_mode(mode: str, on_gpu: bool, strategy: str, zero_stage: int) -> str:
    """What train.compile means here: `auto` is `layers` on GPUs (`loss` under ZeRO-3, whose sharded
    weights dynamo cannot trace) and `none` on CPU."""
    if mode != "auto":
        return mode
    if not on_gpu:
        return "none"
    if strategy == "deepspeed" and zero_stage == 3:
        return "loss"
    return "layers"
