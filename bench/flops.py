"""FLOPs per token of a LoRA step on a Llama-shaped model, for MFU: the product's formula
(lora_launch.launcher.speed.flops_per_token, which the preview's time estimate uses), fed from an arch dict."""

from __future__ import annotations

from lora_launch.launcher import speed

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
)

PROJ_SHAPES = {  # (in, out) of each projection, as multiples resolved in linear_shapes()
    "q_proj": ("h", "h"),
    "k_proj": ("h", "kv"),
    "v_proj": ("h", "kv"),
    "o_proj": ("h", "h"),
    "gate_proj": ("h", "i"),
    "up_proj": ("h", "i"),
    "down_proj": ("i", "h"),
}


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of one decoder layer."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    kv = h // arch["num_attention_heads"] * arch.get("num_key_value_heads", arch["num_attention_heads"])
    size = {"h": h, "i": i, "kv": kv}
    return {name: (size[a], size[b]) for name, (a, b) in PROJ_SHAPES.items()}


def matmul_params(arch: dict) -> int:
    """Weights that take part in matrix products per token: every projection plus lm_head."""
    per_layer = sum(a * b for a, b in linear_shapes(arch).values())
    return arch["num_hidden_layers"] * per_layer + arch["hidden_size"] * arch["vocab_size"]


def lora_params(arch: dict, r: int, targets: list[str]) -> int:
    shapes = linear_shapes(arch)
    return arch["num_hidden_layers"] * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def flops_per_token(arch: dict, seq: float, recompute: bool, r: int, targets: list[str]) -> float:
    """Training FLOPs per token of a frozen-base LoRA step (4N, 6N with recompute; see speed.flops_per_token)."""
    return speed.flops_per_token(
        matmul_params(arch),
        lora_params(arch, r, targets),
        arch["num_hidden_layers"],
        arch["hidden_size"],
        seq,
        recompute,
    )
