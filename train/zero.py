"""The one adapter to DeepSpeed ZeRO's internals: the trainable LoRA weights and their optimizer state as
full tensors by parameter name, out of and back into a model and optimizer that ZeRO may partition, and
DeepSpeed's loss scaler. FSDP2's adapter, on torch's public state_dict functions, is in train/fsdp.py; which one a
run uses is `lora_launch.train.state.adapter_for`.

ZeRO keeps the fp32 weights and the optimizer state in flat partitions spread over the ranks. DeepSpeed's
`safe_get/set_full_*` functions reach them by parameter, but a resumed optimizer has no state yet (torch
creates it at the first step), so restoring also needs private parts of DeepSpeed. They are all here,
written against the DeepSpeed versions in SUPPORTED; tests/unit/test_zero_adapter.py checks that the
installed DeepSpeed is in that range and still has every private name used here.
"""

from __future__ import annotations

import torch

from lora_launch.strategies import strategy_for
from lora_launch.train.model import decoder_layer_classes

SUPPORTED = ">=0.17,<0.20"  # the DeepSpeed versions this adapter was written against
LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter of the unwrapped model, in a fixed order."""
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gather_whole_layers(cfg, model, ds_config: dict, checkpointed: int | None = None) -> list[str]:
    """Under ZeRO-3 with grad ckpt, have DeepSpeed gather each decoder layer's weights in one go (its "leaf
    modules") instead of hooking every submodule, whose host time is most of a ZeRO-3 step (bench/README.md,
    "ZeRO-3's whole layers"). Without grad
    ckpt DeepSpeed 0.19.8 frees a leaf layer's weights before PEFT's LoRA backward needs them, so it is left
    off there; a `leaf_module` in the user's own DeepSpeed JSON (in `ds_config`, the merged config the
    Accelerator was given) is theirs to set. `checkpointed`: only the first that many decoder layers recompute
    (train.grad_ckpt), and only they are gathered whole (None: all). Returns the class names set, for the log.
    Call before accelerate prepares the model."""
    if not strategy_for(cfg).gathers_whole_layers(cfg):
        return []
    if "leaf_module" in ds_config.get("zero_optimization", {}):
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = tuple(decoder_layer_classes(base))
    layers = [m for m in base.modules() if isinstance(m, classes)] if classes else []
    leaves = layers if checkpointed is None else layers[:checkpointed]
    if leaves:
        from deepspeed.utils import set_z3_leaf_module

        for layer in leaves:
            set_z3_leaf_module(layer, True)
    return sorted({type(m).__name__ for m in leaves})


def on_cpu(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` on the CPU, taken now: the adapters' `to_host` unless the caller gives its own."""
    return tensor.detach().to("cpu", copy=True)


def full_shape(p) -> torch.Size:
    """The parameter's shape before partitioning (ZeRO-3 leaves an empty placeholder in p itself)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


class TorchAdapter:
    """Plain torch (one process, DDP): every rank holds whole parameters and optimizer state."""

    def __init__(self, torch_optimizer: torch.optim.Optimizer):
        self.torch_optimizer = torch_optimizer

    def full_trainable_state(self, model, to_host=None) -> tuple[dict, dict]:
        """Full LoRA weights and optimizer state, as {"param/NAME", "optim/KEY/NAME"}, and the optimizer's
        {"keys", "step"}. A collective under ZeRO: every rank calls it. Each tensor is `to_host(key, tensor)`
        (`tensor` may be the live one): by default a copy on the CPU, taken now.

        Read through the optimizer's own state_dict, so any torch optimizer's state is saved as it holds it
        (bitsandbytes' 8-bit states with their quantisation maps and block scales included)."""
        to_host = to_host or on_cpu
        opt, names = self.torch_optimizer, {id(p): n for n, p in trainable(model)}
        saved = opt.state_dict()["state"]  # keyed by position in param_groups order
        out, keys, step = {}, set(), 0.0
        for i, p in enumerate(self._params()):
            name = names[id(p)]
            out[f"param/{name}"] = to_host(f"param/{name}", p.detach())
            for k, v in _flat_state(saved.get(i, {})).items():
                if k == "step":
                    step = float(v)
                elif torch.is_tensor(v):
                    out[f"optim/{k}/{name}"] = to_host(f"optim/{k}/{name}", v)  # as held: bitsandbytes marks paged ones
                    keys.add(k)
        return out, {"keys": sorted(keys), "step": step}

    def load_full_trainable_state(self, model, tensors: dict, meta: dict) -> None:
        """Put what full_trainable_state returned (by this or another adapter) into the model and optimizer."""
        opt, names = self.torch_optimizer, {id(p): n for n, p in trainable(model)}
        # torch's optimizers keep the step as a tensor, bitsandbytes' as an int
        torch_step = type(opt).__module__.startswith("torch.")
        state = {}
        for i, p in enumerate(self._params()):
            name = names[id(p)]
            with torch.no_grad():
                p.copy_(tensors[f"param/{name}"].to(p.device))
            st = {k: tensors[f"optim/{k}/{name}"] for k in meta["keys"] if f"optim/{k}/{name}" in tensors}
            if st:
                st["step"] = torch.tensor(meta["step"], dtype=torch.float32) if torch_step else int(meta["step"])
                state[i] = _nested_state(st)
        current = opt.state_dict()
        opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})  # this run's lr etc.

    def loss_scaler(self):
        """DeepSpeed's loss scaler, with state_dict/load_state_dict; None here."""
        return None

    def _params(self) -> list[torch.Tensor]:
        """The parameters in param_groups order: the positions the optimizer's state_dict is keyed by."""
        return [q for group in self.torch_optimizer.param_groups for q in group["params"]]


def _flat_state(state: dict) -> dict:
    """One parameter's optimizer state with nested dicts (bitsandbytes keeps its 8-bit buffers in one)
    as `outer.inner` keys."""
    flat = {}
    for k, v in state.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        else:
            flat[k] = v
    return flat


def _nested_state(flat: dict) -> dict:
    """The inverse of _flat_state."""
    state: dict = {}
    for k, v in flat.items():
        outer, _, inner = k.partition(".")
        if inner:
            state.setdefault(outer, {})[inner] = v
        else:
            state[k] = v
    return state


class DeepSpeedAdapter(TorchAdapter):
    """DeepSpeed ZeRO-1/2/3: the torch optimizer's state is keyed by ZeRO's fp32 partitions."""

    def __init__(self, zero_optimizer, torch_optimizer: torch.optim.Optimizer):
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        super().__init__(torch_optimizer)
        self.zero = zero_optimizer
        self.stage3 = isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3)

    def full_trainable_state(self, model, to_host=None) -> tuple[dict, dict]:
        """Full LoRA weights and optimizer state, as {"param/NAME", "optim/KEY/NAME"}, each `to_host(key, tensor)`
        (by default a copy on the CPU), and the optimizer's {"keys", "step"}. A collective under ZeRO: every
        rank calls it."""
        to_host = to_host or on_cpu
        keys, step = self._layout()
        out = {}
        for name, p in trainable(model):
            parts = {f"param/{name}": self._full_param(p)}
            parts.update({f"optim/{k}/{name}": self._full_optimizer_state(p, k) for k in keys})
            out.update({key: to_host(key, t.detach().reshape(full_shape(p))) for key, t in parts.items()})
        return out, {"keys": keys, "step": step}

    def load_full_trainable_state(self, model, tensors: dict, meta: dict) -> None:
        """Put what full_trainable_state returned into the (maybe partitioned) model and optimizer."""
        keys = meta["keys"]
        self._create_optimizer_state(keys, meta["step"])
        for name, p in trainable(model):
            states = {k: tensors[f"optim/{k}/{name}"].to(p.device) for k in keys}
            self._set_full(p, tensors[f"param/{name}"].to(p.device), states)

    def loss_scaler(self):
        scaler = getattr(self.zero, "loss_scaler", None)
        return _DeepSpeedLossScaler(scaler) if hasattr(scaler, "cur_scale") else None

    def _full_param(self, p) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)

    def _full_optimizer_state(self, p, key: str) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(p, key)

    def _set_full(self, p, value: torch.Tensor, states: dict) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(p, value)
        for k, v in states.items():
            safe_set_full_optimizer_state(p, v, k)
        # also the working copy the forward pass uses: DeepSpeed refreshes it from fp32 only after a step
        if self.stage3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(value.reshape(p.shape).to(p.dtype))
        else:
            with torch.no_grad():
                p.data.copy_(value.reshape(p.shape).to(p.dtype))

    def _state_keys(self) -> list[torch.Tensor]:
        # ZeRO-3's param_groups are empty between steps
        if self.stage3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def _layout(self) -> tuple[list[str], float]:
        state = next(iter(self.torch_optimizer.state.values()), None)
        if state is None:
            return [], 0.0
        keys = sorted(k for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0)
        return keys, float(state["step"]) if "step" in state else 0.0

    def _create_optimizer_state(self, keys: list[str], step: float) -> None:
        # torch optimizers create their state lazily at the first step; a resume needs it now
        for q in self._state_keys():
            st = self.torch_optimizer.state[q]
            old = st.get("step")
            st["step"] = torch.full_like(old, step) if torch.is_tensor(old) else torch.tensor(step, dtype=torch.float32)
            for k in keys:
                if k not in st:
                    st[k] = torch.zeros_like(q, memory_format=torch.preserve_format)
        if not self.stage3:  # ZeRO-1/2 map each parameter into the state it now has
            self.zero._lazy_init_hp_params_optimizer_state()


class _DeepSpeedLossScaler:
    """DeepSpeed's loss scaler (static or dynamic) as a Stateful: its scale and overflow counters."""

    def __init__(self, scaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return {n: float(getattr(self.scaler, n)) for n in LOSS_SCALE_FIELDS if hasattr(self.scaler, n)}

    def load_state_dict(self, state: dict) -> None:
        for n, v in state.items():
            old = getattr(self.scaler, n)
            setattr(self.scaler, n, torch.full_like(old, v) if torch.is_tensor(old) else type(old)(v))
