"""distributed=fsdp2: the PEFT model sharded with torch's `fully_shard`, and the checkpoint adapter that gathers
its trainable parameters and their optimizer state whole, by name.

The ranks shard the model themselves rather than through accelerate's FSDP2 plugin: accelerate 1.15 applies
that plugin only on GPU-like distributed types, and on CPU (gloo) it drops it without a word and trains
unsharded. Sharding here runs the same calls on CPU and GPU, so the CPU tests exercise what GPUs run. The
Accelerator stays the one DDP uses, given the optimizer alone: process group, device, gradient accumulation
and clipping (accelerate's clipping reads DTensor gradients). What is applied comes from
`lora_launch.strategies.fsdp2.config`.
"""

from __future__ import annotations

import functools

import torch
from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for
from lora_launch.strategies.fsdp2 import config as fsdp2_config
from lora_launch.strategies.fsdp2 import layers_per_group
from lora_launch.train.model import decoder_layer_classes
from lora_launch.train.zero import TorchAdapter, on_cpu, trainable


def decoder_layers(model) -> list[torch.nn.Module]:
    """The instances of `decoder_layer_classes`, in the model's (forward) order: what `shard` groups."""
    classes = tuple(decoder_layer_classes(model))
    layers = [m for m in model.modules() if isinstance(m, classes)] if classes else []
    if not layers:
        raise ConfigError(
            f"distributed=fsdp2: {type(model).__name__} names no decoder layer class "
            "(_no_split_modules) to shard by; use distributed=ddp or zero3"
        )
    return layers


def _process_group(plan: RunPlan) -> None:
    """fully_shard needs a process group; a single process started without torchrun gets one of its own."""
    import torch.distributed as dist

    if not dist.is_initialized() and plan.world_size == 1:
        dist.init_process_group("nccl" if plan.on_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def build_device(cfg: DictConfig, plan: RunPlan, device: torch.device, main: bool) -> torch.device:
    """Where this rank builds the base model before `shard`: where the strategy `loads_from_rank0`, rank 0 on its
    CPU and every other rank on the meta device (its shape alone), so no rank ever holds the whole model on its
    accelerator and only one holds it in host memory; else `device`, as DDP and ZeRO load."""
    if not strategy_for(cfg).loads_from_rank0(cfg, plan):
        return device
    return torch.device("cpu") if main else torch.device("meta")


def shard(cfg: DictConfig, plan: RunPlan, model, main: bool):
    """Shard the PEFT `model` in place (each decoder layer, then the causal LM as the root), fill the shards
    from rank 0's weights when the ranks built it as `build_device` says, and run forward under autocast in
    the plan's precision; returns the model. Build the optimizer after this, over the sharded parameters.

    The root is the causal LM inside the PEFT wrapper, not the wrapper: generate() calls the causal LM
    directly, and its hooks are what gather the root group's weights.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    spec = fsdp2_config(cfg, plan)
    _process_group(plan)
    m = spec["mesh"]
    # 2-D (replicate, shard): fully_shard then shards within each copy and all-reduces between copies
    mesh = init_device_mesh(
        m["device_type"], tuple(m["shape"]), mesh_dim_names=tuple(m["dim_names"]) if "dim_names" in m else None
    )
    offload = spec["offload"]
    # one process per copy: the frozen base stays whole on the device, out of the gathers (shards_frozen_weights)
    frozen = {p for p in model.parameters() if not p.requires_grad} if spec["frozen_weights"] == "whole" else None
    common = dict(
        mesh=mesh,
        ignored_params=frozen,
        mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy(pin_memory=offload["pin_memory"]) if offload["params"] else OffloadPolicy(),
    )
    from_rank0 = strategy_for(cfg).loads_from_rank0(cfg, plan)
    # rank 0's whole weights (base and adapters, as PEFT initialised them), held by reference until sent
    whole = model.state_dict() if from_rank0 and main else {}
    root = model.get_base_model()
    layers = decoder_layers(root)
    groups = layer_groups(layers, layers_per_group(spec["layers_per_group"], stored_bytes(layers[0])))
    for group in groups:
        fully_shard(
            group if len(group) > 1 else group[0], reshard_after_forward=spec["reshard_after_forward"], **common
        )
    fully_shard(root, **common)
    if spec["prefetch"]:
        _prefetch([g[0] for g in groups], spec["prefetch"])
    if isinstance(spec["keep_gathered"], int):
        _keep_last(groups, spec["keep_gathered"])
    if main:
        print(
            f"FSDP2: {len(layers)} decoder layers, {len(groups)} shard group{'s' * (len(groups) > 1)} of up to "
            f"{len(groups[0])} (distributed.layers_per_group={spec['layers_per_group']})",
            flush=True,
        )
    if from_rank0:
        _from_rank0(model, whole)
    autocast = spec["mixed_precision"]["autocast"]
    if autocast:
        model.forward = _under_autocast(model.forward, spec["mesh"]["device_type"], getattr(torch, autocast))
    return model


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters as stored (4-bit packed ones as packed; meta ones by their shape)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def layer_groups(layers: list, per_group: int) -> list[list]:
    """`layers` in forward order, cut into runs of `per_group` consecutive layers (the last run may be shorter)."""
    return [layers[i : i + per_group] for i in range(0, len(layers), per_group)]


def _prefetch(units: list, ahead: int) -> None:
    """Each shard group (in forward order) issues the gathers of the next `ahead` groups as soon as its own is
    done in forward, and of the previous `ahead` in backward, rather than FSDP2's own one ahead."""
    for i, unit in enumerate(units):
        unit.set_modules_to_forward_prefetch(units[i + 1 : i + 1 + ahead])
        unit.set_modules_to_backward_prefetch(units[max(0, i - ahead) : i][::-1])


HEADROOM = 0.9  # distributed.keep_gathered=auto: the share of the GPU memory this process can reach that it may use


def shard_groups(model) -> list[list[torch.nn.Module]]:
    """The decoder layers of the sharded PEFT `model` by shard group (one gather each), in forward order."""
    groups, states = [], []
    for layer in decoder_layers(model.get_base_model()):
        state = layer._get_fsdp_state()
        if states and state is states[-1]:
            groups[-1].append(layer)
        else:
            groups.append([layer])
            states.append(state)
    return groups


def _keep_last(groups: list[list], k: int) -> None:
    """The last `k` shard groups keep their gathered weights from forward to backward (they are gathered once
    a step, not twice); the rest free them after forward. Training computes the same either way. A forward
    without backward (evaluation) leaves a kept group gathered until the next backward; FSDP2 reshards it
    itself before a state_dict reads it."""
    for i, group in enumerate(groups):
        group[0].set_reshard_after_forward(i < len(groups) - k, recurse=False)


def gathered_bytes(group: list[torch.nn.Module]) -> int:
    """Bytes of a shard group's sharded parameters gathered whole (a sharded parameter's numel is its whole
    shape's); a parameter FSDP2 leaves whole is never gathered."""
    return sum(p.numel() * p.element_size() for layer in group for p in layer.parameters() if is_dtensor(p))


def groups_that_fit(sizes: list[int], spare: float) -> int:
    """How many of the last shard groups (`sizes`: their gathered bytes, in forward order) fit in `spare` bytes."""
    k, used = 0, 0
    for size in reversed(sizes):
        if used + size > spare:
            break
        k, used = k + 1, used + size
    return k


def keep_gathered_after_first_step(
    cfg: DictConfig, model, device: torch.device, step_start_bytes: int, fill: float
) -> tuple[int, int, float] | None:
    """distributed.keep_gathered=auto, after the first step this process ran: keep as many of the last shard
    groups gathered from forward to backward as the GPU's spare memory holds, the same number on every rank
    (the fewest any rank can hold: the ranks' gathers must match). The step's peak is scaled up to a full
    micro-batch (`fill`: the first step's largest micro-batch as a share of micro_batch_size x seq_len rows, so
    shorter first batches are not taken for the largest). Returns (kept, groups, spare GiB), or None where
    there is nothing to decide (another setting, no GPU: all groups resharded). A collective: every rank calls
    it."""
    import torch.distributed as dist

    if not strategy_for(cfg).decides_gathers_after_first_step(cfg):
        return None
    groups = shard_groups(model)
    k, spare = 0, 0.0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reachable = free + torch.cuda.memory_reserved(device)
        peak = torch.cuda.max_memory_reserved(device)
        peak = step_start_bytes + (peak - step_start_bytes) / max(min(fill, 1.0), 1e-3)
        spare = HEADROOM * reachable - peak
        k = groups_that_fit([gathered_bytes(g) for g in groups], spare)
    agreed = torch.tensor([k], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    k = int(agreed.item())
    _keep_last(groups, k)
    return k, len(groups), spare / 2**30


def _from_rank0(model, whole: dict) -> None:
    """Send rank 0's whole weights to every rank, tensor by tensor, each keeping its shard; and give every
    rank rank 0's random state, which building the model on the meta device did not advance elsewhere (so
    the ranks draw alike afterwards, as when each builds the whole model)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    whole.clear()
    # a meta shard is replaced by a new parameter, once per name: tie the output embedding to the input again
    model.get_base_model().tie_weights()
    left = [n for n, p in model.named_parameters() if local_shard(p).is_meta]
    if left:
        raise RuntimeError(f"FSDP2: rank 0 sent no weights for {left[:3]}")
    on_gpu = torch.cuda.is_available() and local_shard(next(model.parameters())).is_cuda
    state = [torch.get_rng_state(), torch.cuda.get_rng_state() if on_gpu else None]  # rank 0 drew on its GPU
    dist.broadcast_object_list(state, src=0)
    torch.set_rng_state(state[0])
    if on_gpu:
        torch.cuda.set_rng_state(state[1])


def _under_autocast(forward, device_type: str, dtype: torch.dtype):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    return wrapped


def is_dtensor(t) -> bool:
    """Whether `t` is a DTensor (an FSDP2 shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if is_dtensor(t) else t


_WHOLE = dict(full_state_dict=True, cpu_offload=True)  # gathered whole, on the CPU of rank 0 only


def full_trainable_params(model) -> dict:
    """The trainable parameters (and any tied weight state_dict lists with them) whole, by name, on rank 0's
    CPU; empty on the other ranks. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True, **_WHOLE))


class Fsdp2Adapter(TorchAdapter):
    """FSDP2: every parameter and its optimizer state is a DTensor shard. torch's distributed state_dict
    functions gather the trainable ones whole (on rank 0, which writes them) and cut whole tensors back into
    this run's shards, so the saved form is DDP's and ZeRO's, at any world size."""

    def full_trainable_state(self, model, to_host=None) -> tuple[dict, dict]:
        """Full LoRA weights and optimizer state on rank 0, as {"param/NAME", "optim/KEY/NAME"} (empty on the
        other ranks), each `to_host(key, tensor)` (by default a copy on the CPU), and the optimizer's {"keys",
        "step"}. A collective: every rank calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        to_host = to_host or on_cpu
        params = full_trainable_params(model)
        optim = get_optimizer_state_dict(model, self.torch_optimizer, options=StateDictOptions(**_WHOLE))
        keys, step = self._layout()
        out = {}
        if params:  # rank 0; the copies keep the snapshot apart from the live tensors it may share storage with
            for name, _ in trainable(model):
                out[f"param/{name}"] = to_host(f"param/{name}", params[name].detach())
                out.update({f"optim/{k}/{name}": to_host(f"optim/{k}/{name}", optim["state"][name][k]) for k in keys})
        return out, {"keys": keys, "step": step}

    def load_full_trainable_state(self, model, tensors: dict, meta: dict) -> None:
        """Put what full_trainable_state returned (by this or another adapter) into the sharded model and
        optimizer; every rank holds the whole tensors and keeps its own shard of them."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        named = trainable(model)
        set_model_state_dict(model, {name: tensors[f"param/{name}"] for name, _ in named}, options=options)
        state = {}
        for name, _ in named:
            st = {k: tensors[f"optim/{k}/{name}"] for k in meta["keys"] if f"optim/{k}/{name}" in tensors}
            if st:
                state[name] = {**st, "step": torch.tensor(meta["step"], dtype=torch.float32)}
        by_id = {id(p): name for name, p in named}
        # this run's param groups (lr, weight decay), as the torch adapter keeps them
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]}
            for g in self.torch_optimizer.param_groups
        ]
        set_optimizer_state_dict(model, self.torch_optimizer, {"state": state, "param_groups": groups}, options=options)

    def _layout(self) -> tuple[list[str], float]:
        """The optimizer's state keys and step, from this rank's state (alike on every rank)."""
        state = next(iter(self.torch_optimizer.state.values()), None)
        if state is None:
            return [], 0.0
        keys = sorted(k for k, v in state.items() if k != "step" and torch.is_tensor(v))
        return keys, float(state["step"]) if "step" in state else 0.0
