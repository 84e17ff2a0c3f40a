"""Which decoder layers recompute their activations in backward (train.grad_ckpt), set on the model.

Checkpointing is switched on for the model as a whole when the config asks for any (lora_launch.train.model), then
each decoder layer's own flag says whether it recomputes: the first N in forward order do, the rest keep their
activations. N follows from the setting: a number, every layer (true), or as many kept layers as a memory budget
holds under the activation model the preview uses (lora_launch.run.activations); for `auto` that budget is what the
GPU's free memory leaves after the weights, adapters, gradients and optimizer state the strategy holds (none
checkpointed on CPU). Every rank checkpoints the same layers: under ZeRO-3 and FSDP2 a recompute gathers weights,
a collective.

Within a checkpointed layer everything is recomputed (layer-granular); a compiled kept layer already recomputes its
norms' and activations' elementwise work rather than storing it (Inductor's partitioner), which is what selective
checkpointing would add.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lora_launch.conf.dtypes import FLOATS
from lora_launch.conf.grad_ckpt import read
from lora_launch.conf.schema import chunked_loss
from lora_launch.run.activations import auto_budget, dequantised_bytes, layer_activations, logits_bytes
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for
from lora_launch.strategies.fsdp2 import gathered_bytes
from lora_launch.train.model import decoder_layer_classes


def base_of(model):
    """The causal LM inside DDP/DeepSpeed and PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers that can be checkpointed, in forward order."""
    root = base_of(model)
    classes = tuple(decoder_layer_classes(root))
    return [m for m in root.modules() if isinstance(m, classes) and hasattr(m, "gradient_checkpointing")]


def checkpoint_first(model, n: int) -> None:
    """The first `n` decoder layers recompute their activations in backward; the others keep them."""
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = i < n


def frozen_linear_params(layer) -> int:
    """Weights of a decoder layer's frozen linears (the base's, 4-bit packed ones by their whole shape; not the
    adapters)."""
    return sum(
        m.in_features * m.out_features
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )


def _stored_bytes(params) -> int:
    """Bytes of parameters as stored (packed 4-bit as packed; sharded and meta ones by their whole shape)."""
    return sum(p.numel() * p.element_size() for p in params)


def _held_bytes(cfg: DictConfig, plan: RunPlan, model, layers: list) -> float:
    """What the strategy's memory model says this process holds of the weights, the adapters with their gradients
    and the optimizer state (as the preview counts them)."""
    base = [p for p in base_of(model).parameters() if not p.requires_grad]
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    whole = _stored_bytes(base)
    per_layer = _stored_bytes(p for p in layers[0].parameters() if not p.requires_grad) if layers else 0

    def gathered(per_group, prefetch, kept) -> float:
        return gathered_bytes(whole, per_layer, len(layers), per_group, prefetch, kept)

    held = strategy_for(cfg).memory(cfg, plan, whole, adapters, gathered)
    return held.weights + held.lora + held.optimizer


def _agree(n: int, device: torch.device) -> int:
    """The most layers any rank checkpoints: every rank must recompute the same layers."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def choose(cfg: DictConfig, plan: RunPlan, model, device: torch.device) -> tuple[int, int, str]:
    """(layers checkpointed, decoder layers, why) for train.grad_ckpt on this model; call once every rank holds
    its weights as the strategy places them (a collective for `auto`)."""
    setting, layers = read(cfg.train.grad_ckpt), decoder_layers(model)
    count = len(layers)
    n = setting.checkpointed(count)
    if n is not None:
        return n, count, f"train.grad_ckpt={str(cfg.train.grad_ckpt).lower()}"
    config = base_of(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = head_dim * (getattr(text, "num_key_value_heads", None) or heads)
    act = FLOATS[str(cfg.quant.compute_dtype) if cfg.quant.mode == "nf4" else plan.model_dtype].bytes
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    dequantised = dequantised_bytes(cfg, plan, frozen_linear_params(layers[0]) if layers else 0)
    acts = layer_activations(
        count, text.hidden_size, kv, text.intermediate_size, tokens, act, plan.compile == "layers", dequantised
    )
    if setting.kind == "memory":
        n = acts.checkpointed_within(setting.budget)
        return (
            n,
            count,
            f"train.grad_ckpt={cfg.train.grad_ckpt}: the activations within {setting.budget / 2**30:.2f} GiB",
        )
    if device.type != "cuda":
        return _agree(0, device), count, "train.grad_ckpt=auto: none on CPU"
    free, _ = torch.cuda.mem_get_info(device)
    reachable = free + torch.cuda.memory_reserved(device)
    logits = logits_bytes(tokens, text.hidden_size, text.vocab_size, chunked_loss(cfg))
    budget = auto_budget(reachable, _held_bytes(cfg, plan, model, layers), logits)
    n = _agree(acts.checkpointed_within(budget), device)
    return n, count, f"train.grad_ckpt=auto: {max(budget, 0) / 2**30:.2f} GiB for the activations on this GPU"


def checkpointed_layers(cfg: DictConfig, plan: RunPlan, model, device: torch.device, main: bool) -> int:
    """Choose and set which decoder layers recompute their activations (the first N), say so on the main rank;
    returns N."""
    if not read(cfg.train.grad_ckpt).on:
        return 0
    n, count, why = choose(cfg, plan, model, device)
    checkpoint_first(model, n)
    if main:
        print(f"grad ckpt: the first {n} of {count} decoder layers recompute their activations in backward ({why})")
    return n
