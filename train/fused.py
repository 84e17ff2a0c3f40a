"""train.fused_projections: each decoder layer's q/k/v projections as one matmul, and its gate/up projections as
another, with every targeted projection's LoRA adapter applied to its slice of the output.

A Llama-style layer reads the same input through three attention projections and two MLP projections: five
products where two would do, and in backward five input-gradient products plus the adds that sum them. Here the
frozen base weights of a group are laid end to end in one matrix (k and v narrower than q under GQA; the biases,
where the model has them, concatenated at each call), and each projection's own weight Parameter becomes a view of
its rows, so nothing is held twice and the model's parameters, names and state dict stay exactly what they were.
PEFT's lora modules stay in place with their Parameters: the saved adapter, the optimizer's state and checkpoints
are those of the separate projections, and a run may turn the option on or off when it resumes.

The module's own forward (transformers' attention or MLP) is left alone. Each projection of a group gets a forward
that asks the group for its output: the first of the group called with an input computes all of them (one product
of the joined weights, then each adapter's `lora_B(lora_A(dropout(x))) * scaling` added to its slice, in the
group's order, so dropout draws its masks in the order the separate projections would), and the others take theirs
from what it left. Where the adapters of a group all read the input without dropout (lora.dropout=0, or eval),
their lora_A matrices run as one product too.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from lora_launch.conf.schema import ConfigError

# the projections that read one input, in the order Llama-style modules call them
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _lora_linear():
    from peft.tuners.lora.layer import Linear

    return Linear


def _base_linear(module) -> torch.nn.Linear | None:
    """The plain linear layer a projection computes with: itself, or the base layer of PEFT's LoRA linear
    (vanilla LoRA only); None for anything else (4-bit layers, DoRA, weights kept transposed)."""
    if type(module) is torch.nn.Linear:
        return module
    if not isinstance(module, _lora_linear()) or module.fan_in_fan_out or module.lora_variant or module.merged:
        return None
    base = module.get_base_layer()
    return base if type(base) is torch.nn.Linear else None


def _no_dropout(dropout: torch.nn.Module) -> bool:
    return isinstance(dropout, torch.nn.Identity) or (
        isinstance(dropout, torch.nn.Dropout) and (dropout.p == 0 or not dropout.training)
    )


class _Group:
    """Projections of one module that read the same input, computed from their joined frozen weight."""

    def __init__(self, members: list[torch.nn.Module], bases: list[torch.nn.Linear], weight: torch.Tensor):
        self.members, self.bases, self.weight = members, bases, weight
        self.sizes = [b.out_features for b in bases]
        self.pending = None  # (input, outputs not yet taken: None where taken)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output for input `x`: computed with the whole group's unless a call before left it."""
        pending = self.pending
        if pending is None or pending[0] is not x or pending[1][index] is None:
            pending = (x, self.outputs(x))
        out = pending[1][index]
        rest = tuple(None if i == index else o for i, o in enumerate(pending[1]))
        self.pending = None if all(o is None for o in rest) else (x, rest)
        return out

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's output: one product of the joined weights, each adapter added to its slice."""
        biases = [b.bias for b in self.bases]
        bias = None if biases[0] is None else torch.cat(biases)
        parts = list(F.linear(x, self.weight, bias).split(self.sizes, dim=-1))
        for i, delta in self._deltas(x).items():
            parts[i] = (parts[i] + delta).to(parts[i].dtype)
        return tuple(parts)

    def _adapters(self) -> dict[int, list[str]]:
        """Member index -> the adapters it adds now (PEFT's rule: active, not disabled, holding lora_A)."""
        found = {}
        for i, m in enumerate(self.members):
            if type(m) is torch.nn.Linear or m.disable_adapters:
                continue
            names = [a for a in m.active_adapters if a in m.lora_A]
            if names:
                found[i] = names
        return found

    def _deltas(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each adapted member's LoRA term, as PEFT's lora.Linear computes it (input cast to lora_A's dtype)."""
        adapters = self._adapters()
        singles = [(i, names[0]) for i, names in adapters.items() if len(names) == 1]
        shared = len(singles) > 1 and len(singles) == len(adapters)
        if shared:
            As = [self.members[i].lora_A[a] for i, a in singles]
            shared = all(_no_dropout(self.members[i].lora_dropout[a]) for i, a in singles) and all(
                A.weight.dtype == As[0].weight.dtype for A in As
            )
        if shared:  # one product for every lora_A: they read the same input, undropped
            m0 = self.members[singles[0][0]]
            h = F.linear(m0._cast_input_dtype(x, As[0].weight.dtype), torch.cat([A.weight for A in As]))
            hs = h.split([A.out_features for A in As], dim=-1)
            return {
                i: self.members[i].lora_B[a](hi) * self.members[i].scaling[a]
                for (i, a), hi in zip(singles, hs, strict=True)
            }
        deltas = {}
        for i, names in adapters.items():
            m, xi, delta = self.members[i], x, None
            for a in names:
                xi = m._cast_input_dtype(xi, m.lora_A[a].weight.dtype)
                term = m.lora_B[a](m.lora_A[a](m.lora_dropout[a](xi))) * m.scaling[a]
                delta = term if delta is None else delta + term
            deltas[i] = delta
        return deltas


def _member_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A joined projection's forward: its part of the group's outputs for `x`."""
    return module.fused_group.output(module.fused_index, x)


def _joinable(bases: list[torch.nn.Linear]) -> bool:
    """Frozen weights of one input width, dtype and device (not meta), all with a bias or none."""
    w0, biased = bases[0].weight, bases[0].bias is not None
    return w0.device.type != "meta" and all(
        not b.weight.requires_grad
        and b.weight.shape[1] == w0.shape[1]
        and (b.weight.dtype, b.weight.device) == (w0.dtype, w0.device)
        and (b.bias is not None) == biased
        for b in bases
    )


def _join(parent: torch.nn.Module, names: tuple[str, ...]) -> _Group | None:
    """Join `parent`'s projections `names` into one group, or None where it has not all of them as plain
    frozen linear layers of one input width, dtype and device."""
    members = [getattr(parent, n, None) for n in names]
    if any(m is None for m in members):
        return None
    bases = [_base_linear(m) for m in members]
    if any(b is None for b in bases) or not _joinable(bases):
        return None
    w0 = bases[0].weight
    weight = torch.empty(sum(b.out_features for b in bases), w0.shape[1], dtype=w0.dtype, device=w0.device)
    start = 0
    for b in bases:  # one projection at a time: its own storage is freed as its Parameter moves into the joined one
        rows = weight[start : start + b.out_features]
        rows.copy_(b.weight.detach())
        b.weight.data = rows
        start += b.out_features
    group = _Group(members, bases, weight)
    for i, m in enumerate(members):
        m.fused_group, m.fused_index = group, i
        m.forward = types.MethodType(_member_forward, m)
    return group


def fuse_projections(model) -> dict[str, int]:
    """Join the q/k/v and gate/up projections of every module of `model` (a PEFT model, or any model) that has
    them; returns how many groups of each kind were joined ({"q_proj+k_proj+v_proj": 32, ...})."""
    joined: dict[str, int] = {}
    for parent in list(model.modules()):
        for names in GROUPS:
            if _join(parent, names) is not None:
                key = "+".join(names)
                joined[key] = joined.get(key, 0) + 1
    return joined


def groups_of(model) -> list[_Group]:
    """The joined groups of `model`, once each."""
    found = {id(g): g for m in model.modules() if (g := getattr(m, "fused_group", None)) is not None}
    return list(found.values())


def still_joined(model) -> bool:
    """Whether every joined projection's weight is still a view of its group's joined weight (a framework that
    re-creates the parameters, casting or moving them, would leave the group computing with copies)."""
    for group in groups_of(model):
        start, row = 0, group.weight.stride(0) * group.weight.element_size()
        for b in group.bases:
            w = b.weight
            if w.device != group.weight.device or w.dtype != group.weight.dtype:
                return False
            if w.data_ptr() != group.weight.data_ptr() + start * row:
                return False
            start += b.out_features
    return True


def install(model) -> str:
    """Join `model`'s projections for train.fused_projections; returns the log line saying what was joined.
    ConfigError where the model has none to join."""
    joined = fuse_projections(model)
    if not joined:
        raise ConfigError(
            "train.fused_projections=true: the model has no q_proj/k_proj/v_proj or gate_proj/up_proj linear layers "
            "to join (plain or vanilla-LoRA layers of one input width); set train.fused_projections=false"
        )
    return "fused projections (train.fused_projections=true): " + ", ".join(
        f"{names} in {count} modules" for names, count in joined.items()
    )


def check_joined(cfg, model) -> None:
    """ConfigError where the strategy's wrapping re-created the joined weights (cast or moved them)."""
    if cfg.train.fused_projections and not still_joined(model):
        raise ConfigError(
            f"train.fused_projections=true with distributed={cfg.distributed.name}: the strategy re-created the base "
            "weights after they were joined (the joined copies would be held twice); set train.fused_projections=false"
        )
