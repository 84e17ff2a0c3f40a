"""distributed=fsdp2|fsdp2_offload: torch's `fully_shard` (FSDP2), applied by the ranks themselves: the frozen
base, the adapters and their optimizer state sharded per group of decoder layers, within copies of the model
(hybrid sharding) where there are several; a copy on one process keeps its frozen base whole
(`shards_frozen_weights`). What the ranks apply is `config`, shown in RUN/fsdp2.json; the
sharding and the checkpoint adapter are lora_launch.train.fsdp."""

from __future__ import annotations

from lora_launch.strategies.base import MemoryTerms, Strategy

# the optimizers that can step FSDP2's sharded (DTensor) parameters: torch's AdamW, not bitsandbytes'
TORCH_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
GROUP_BYTES = 2 * 2**30  # distributed.layers_per_group=auto: the most weight bytes in a group of several layers
GROUP_LAYERS = 4  # and the most layers in one


def layers_per_group(setting, layer_bytes: float) -> int:
    """Decoder layers in each FSDP2 shard group: `setting` (distributed.layers_per_group) when it is a number;
    for "auto", as many layers of `layer_bytes` (one layer's weights as stored) as fit GROUP_BYTES, from 1 to
    GROUP_LAYERS: each group's hooks and gathers cost host time, so several layers a group run faster than one
    (bench/README.md, "FSDP2's shard groups")."""
    if setting != "auto":
        return int(setting)
    return max(1, min(GROUP_LAYERS, int(GROUP_BYTES // max(layer_bytes, 1.0))))


def gathered_bytes(
    whole: float, per_layer: float, layers: int, per_group="auto", prefetch: int | None = None, kept: int = 0
) -> float:
    """Base weights FSDP2 holds whole on a device at its peak (`whole`: all of them as stored, `per_layer`: one
    decoder layer's): the root group (everything outside the decoder layers) from forward to backward, the shard
    group computing (`per_group` decoder layers) and one layer more per group prefetched (FSDP2's own: one), which
    is what the measured peaks showed, not two whole groups (bench/README.md, "FSDP2's gathered weights"). `kept`
    groups (distributed.keep_gathered) are held from their forward to their backward on top of that."""
    group = layers_per_group(per_group, per_layer)
    held = group + (prefetch or 1) + kept * group
    return whole - per_layer * layers + min(layers, held) * per_layer


def mesh(cfg, plan) -> tuple[int, int]:
    """(copies, ranks per copy): `distributed.replicate` copies of the model, each sharded over world / copies
    ranks ("auto": one copy per node when several nodes of several processes run, else one in all: a node of
    one process would hold a whole copy, unsharded). `Fsdp2.launch_problems` refuses a count that does not
    divide the world size."""
    r = cfg.distributed.replicate
    if r == "auto":
        copies = plan.num_machines if plan.num_machines > 1 and plan.procs_per_node > 1 else 1
    else:
        copies = int(r)
    return copies, plan.world_size // copies


def shards_frozen_weights(cfg, plan) -> bool:
    """Whether the frozen base weights go into FSDP2's shard groups. Where each copy of the model has one
    process and nothing is offloaded, a shard is the whole weight and each gather only a copy of it, so they
    stay plain tensors on the device, as DDP holds them; the adapters and their optimizer state are still
    FSDP2's (its hooks, its checkpoint adapter, its reductions between copies)."""
    return mesh(cfg, plan)[1] > 1 or bool(cfg.distributed.offload_params)


def config(cfg, plan) -> dict:
    """What every rank applies (torch's fully_shard), from the config and the plan; RUN/fsdp2.json shows it.

    One shard group per `distributed.layers_per_group` consecutive decoder layers (the classes the model names
    in `_no_split_modules`), the rest of the causal LM (embeddings, final norm, output head) in the root group.
    Parameters keep their dtypes (the frozen base in the plan's weight dtype, the LoRA adapters in float32):
    the all-gathers move the base weights as stored, 4-bit packed ones included, and compute runs under
    autocast in the plan's precision, as it does under DDP; gradients are reduced in float32. With several
    copies (`mesh`) the mesh is 2-D, (replicate, shard): torch's hybrid sharding.
    """
    d = cfg.distributed
    offload = bool(d.offload_params)
    copies, per_copy = mesh(cfg, plan)
    return {
        "fsdp_version": 2,
        "mesh": {
            "device_type": "cuda" if plan.on_gpu else "cpu",
            **(
                {"shape": [copies, per_copy], "dim_names": ["replicate", "shard"]}
                if copies > 1
                else {"shape": [plan.world_size]}
            ),
        },
        "shard": "decoder layers (the model's _no_split_modules), layers_per_group to a group, then the causal LM "
        "as the root",
        # "whole": one process per copy, nothing to shard (shards_frozen_weights)
        "frozen_weights": "sharded" if shards_frozen_weights(cfg, plan) else "whole",
        "reshard_after_forward": bool(d.reshard_after_forward),
        # the last N groups not resharded after forward; auto: decided after the first step (the log says)
        "keep_gathered": d.keep_gathered if d.reshard_after_forward else "all",
        "layers_per_group": d.layers_per_group,  # auto: see layers_per_group(); the log says
        "prefetch": d.prefetch,  # null: FSDP2's own (one group ahead)
        "mixed_precision": {
            "param_dtype": None,
            "reduce_dtype": "float32",
            "autocast": None if plan.precision == "float32" else plan.precision,
        },
        "offload": {
            "params": offload,
            "gradients": offload,
            "optimizer_step": offload,
            "pin_memory": offload and plan.on_gpu,
        },
        "compile": plan.compile,
    }


class Fsdp2(Strategy):
    name = "fsdp2"
    shards_model_itself = True

    def problems(self, cfg) -> list[str]:
        d, name, found = cfg.distributed, cfg.distributed.name, []
        if d.zero_stage != 0:
            found.append(
                f"distributed.zero_stage={d.zero_stage} with distributed={name}: FSDP2 shards everything "
                "(ZeRO-3's scope) by itself; set distributed.zero_stage=0"
            )
        if d.offload_params != d.offload_optimizer:
            params, optimizer = str(d.offload_params).lower(), str(d.offload_optimizer).lower()
            found.append(
                f"distributed.offload_params={params} and distributed.offload_optimizer={optimizer} with "
                f"distributed={name}: FSDP2 offloads both or neither; set them equal "
                "(distributed=fsdp2_offload sets both)"
            )
        if cfg.optim.name not in TORCH_OPTIMIZERS:
            found.append(
                f"optim.name={cfg.optim.name} with distributed={name}: bitsandbytes' optimizers cannot "
                "update FSDP2's sharded parameters; use optim.name=adamw_torch (or adamw_torch_fused)"
            )
        if cfg.train.precision == "float16":
            found.append(
                f"train.precision=float16 with distributed={name}: no loss scaler is set up for FSDP2's "
                "sharded gradients; use train.precision=bfloat16 (or float32)"
            )
        return found

    def launch_problems(self, cfg, plan) -> list[str]:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError as e:  # torch < 2.6, or built without distributed support
            import torch

            return [
                f"distributed=fsdp2 needs torch.distributed.fsdp.fully_shard, which torch {torch.__version__} "
                f"here lacks ({e}); install torch >= 2.6, or use distributed=ddp|zero3"
            ]
        copies, world = mesh(cfg, plan)[0], plan.world_size
        if world % copies:
            return [
                f"distributed.replicate={copies} does not divide the world size {world} ({plan.num_machines} "
                f"nodes x {plan.procs_per_node} processes); set a divisor of {world}, or "
                "distributed.replicate=auto"
            ]
        return []

    def shards_weights(self, cfg) -> bool:
        return True

    def loads_from_rank0(self, cfg, plan) -> bool:
        # a 4-bit base is small enough that every rank loads its own (quantised as it loads); a single process
        # builds it where it trains
        return cfg.quant.mode != "nf4" and plan.world_size > 1

    def decides_gathers_after_first_step(self, cfg) -> bool:
        d = cfg.distributed
        return d.keep_gathered == "auto" and bool(d.reshard_after_forward)

    def shown_files(self, cfg, plan) -> dict[str, tuple[str, dict]]:
        return {"fsdp2": ("fsdp2.json", config(cfg, plan))}

    def label(self, plan) -> str:
        return "FSDP2"

    def describe(self, cfg, plan) -> str:
        copies, per_copy = mesh(cfg, plan)
        hybrid = f", {copies} copies each sharded over {per_copy} processes" if copies > 1 else ""
        frozen = "" if shards_frozen_weights(cfg, plan) else "; the frozen base whole, one process per copy"
        return f"FSDP2 (decoder layers in shard groups{hybrid}{frozen})"

    def scaling(self, cfg, plan) -> tuple[float, str]:
        # at world size 1: 98-99% of DDP with the base whole, 77-87% with it sharded (offloaded) and
        # keep_gathered=auto; on 2 GPUs of one host, before keep_gathered: 70% of DDP there
        if plan.world_size == 1:
            if not shards_frozen_weights(cfg, plan):
                return 0.98, "FSDP2 with the base whole against DDP at world size 1"
            return 0.82, "FSDP2 against DDP at world size 1"
        ddp, _ = super().scaling(cfg, plan)
        return 0.70 * ddp, "FSDP2 against DDP on 2 GPUs of one host, and DDP's own scaling on 4"

    def running(self, distributed_type: str, processes: int, plan) -> str:
        return "FSDP2" if processes > 1 else super().running(distributed_type, processes, plan)

    def memory(self, cfg, plan, weights, lora_params, gathered) -> MemoryTerms:
        """The base, the adapters, their gradients and optimizer state all sharded within one copy of the model,
        plus the base weights held gathered (all of them from forward to backward without resharding)."""
        d = cfg.distributed
        share = 0.0 if d.offload_params else 1.0 / mesh(cfg, plan)[1]
        if not shards_frozen_weights(cfg, plan):
            base = weights  # whole on the device, never gathered
        else:
            held = (
                gathered(d.layers_per_group, d.prefetch, d.keep_gathered if isinstance(d.keep_gathered, int) else 0)
                if d.reshard_after_forward
                else weights
            )
            base = weights * share + held
        lora = lora_params * 4.0 * share
        return MemoryTerms(base, lora + lora, lora_params * 8.0 * share)

    def preview_lines(self, cfg, plan, layers, layer_bytes, gib) -> list[str]:
        d = cfg.distributed
        k = min(layers, layers_per_group(d.layers_per_group, layer_bytes))
        lines = [
            f"shard groups {-(-layers // k)} of up to {k} of the {layers} decoder layers "
            f"(distributed.layers_per_group={d.layers_per_group})"
        ]
        if self.decides_gathers_after_first_step(cfg):
            lines.append(
                f"kept gathered the last shard groups that the GPU's spare memory holds after the first "
                f"step (distributed.keep_gathered=auto), at most all {layers} layers' weights whole "
                f"({gib(layer_bytes * layers)}) from forward to backward; distributed.keep_gathered=0 "
                "keeps none"
            )
        return lines


STRATEGY = Fsdp2()
