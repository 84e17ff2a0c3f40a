"""How long a run takes: the FLOPs of a LoRA step, the GPUs' bf16 peaks, and the rates this project measured.

The time estimate is total tokens x FLOPs per token / (GPUs x peak x what bf16 matmuls reach of the peak x MFU x
the strategy's per-GPU scaling). The MFU and the matmul share are this project's own measurements
(bench/README.md, bench/results/); tests/unit/test_speed.py holds the estimate within 15% of the measured
tokens/s rows it is built from. bench/flops.py counts its MFU with the same formula.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_launch.conf.dtypes import HALF


def flops_per_token(
    matmul_params: int, lora_params: int, layers: int, hidden: int, seq: float, recompute: float
) -> float:
    """Training FLOPs per token of a frozen-base LoRA step.

    Frozen base: forward 2N plus backward to the activations 2N (no weight gradients) = 4N, N the weights that
    take part in matrix products (every projection plus the output head); grad ckpt's recompute adds another
    forward (6N). Causal attention's score and value products cost 2 * layers * seq * hidden per token
    forward, three times that with backward (four with recompute). The adapters' own products (forward, input
    and weight gradients) are added exactly; they are small at r=64. `recompute`: the share of the decoder layers
    checkpointed (true: all of them).
    """
    f = float(recompute)
    attn = 2 * layers * seq * hidden
    passes = 2 + f  # 2N each: forward, backward to the activations, and the recomputed layers' forward
    return 2 * matmul_params * passes + attn * (3 + f) + lora_params * (6 + 2 * f)


# bf16 dense tensor peak per GPU in TFLOP/s (the makers' data sheets, no sparsity), by the name torch reports;
# the first pattern that matches wins, so the specific forms come first
BF16_PEAK_TFLOPS = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100 NVL", "H100 NVL", 835.0),
    (r"H200 NVL", "H200 NVL", 835.0),
    (r"GH200", "GH200", 989.4),
    (r"H100|H800", "H100 SXM", 989.4),
    (r"H200", "H200", 989.4),
    (r"B200", "B200", 2250.0),
    (r"A100|A800", "A100", 312.0),
    (r"L40S", "L40S", 362.1),
    (r"L40\b", "L40", 181.0),
    (r"L4\b", "L4", 121.0),
    (r"A10\b", "A10", 125.0),
    (r"RTX 6000 Ada", "RTX 6000 Ada", 364.2),
    (r"RTX 4090", "RTX 4090", 165.2),
    (r"RTX 3090", "RTX 3090", 71.0),
)

# What a large bf16 matmul (8192^3) reached of the peak, measured by bench on the same cards as the MFU below:
# 677-698 TFLOP/s on one H200, 680-702 on one H100 SXM, of 989.4. Assumed for the other cards (not measured).
MATMUL_SHARE = 0.69
MEASURED_ON = "one H200 (7B, seq 512; bigger models ran up to 30% faster)"


@dataclass(frozen=True)
class Rate:
    """The share of the measured matmul rate one kind of run keeps busy, counting every FLOP it computes
    (grad ckpt's recompute included: 6N), and the MFU that is (the model's 4N only)."""

    utilisation: float
    mfu: float
    what: str  # the kind of run, as the preview names it


# Medians of this project's rows from 2026-11-30 on (torch AdamW, the default quant.kernel), one H200, 7B shape,
# seq 512 x 4, r=64 on q/v: bench/results/2026-11-30-h200-{mfu-1,optim-1,optim-2,optim-3,keep-*}.jsonl and
# 2026-12-04-h200-determinism.jsonl. nf4 without grad ckpt has no such row: it is given the nf4 + ckpt rows'
# utilisation, its step being the same kinds of work without the recompute.
RATES = {
    ("bf16", False): Rate(0.75, 0.75, "bf16 LoRA"),
    ("bf16", True): Rate(0.70, 0.47, "bf16 LoRA + grad ckpt"),
    ("nf4", True): Rate(0.68, 0.45, "QLoRA + grad ckpt"),
    ("nf4", False): Rate(0.68, 0.68, "QLoRA + grad ckpt, the recompute left out; QLoRA alone not measured"),
}
SPREAD = 0.15  # the measured rows the estimate must reproduce lie within this of it (tests/unit/test_speed.py)


def _rate(kind: str, share: float) -> Rate:
    """The measured rate of `kind` with `share` of the decoder layers checkpointed (0 or 1: a measured row)."""
    if share in (0.0, 1.0):
        return RATES[kind, bool(share)]
    none, all_ = RATES[kind, False], RATES[kind, True]
    mix = lambda a, b: a + share * (b - a)  # noqa: E731
    return Rate(
        mix(none.utilisation, all_.utilisation),
        mix(none.mfu, all_.mfu),
        f"{all_.what} and {none.what}, weighed by the layers checkpointed",
    )


def gpu_peak(device_name: str) -> tuple[str, float] | None:
    """(short name, bf16 dense TFLOP/s) of a GPU by the name torch gives it; None for one not in the table."""
    for pattern, short, tflops in BF16_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return short, tflops
    return None


def this_host_gpu() -> str | None:
    """The name of this host's first GPU, or None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds per optimizer step and for the run (None where the rate or the steps are unknown), and why."""

    flops_per_step: float
    step_seconds: float | None
    where: str  # "8 x H100 SXM"
    basis: list[str]  # what the rate rests on, or why there is none


def estimate(
    flops_per_step: float,
    device_name: str | None,
    gpus: int,
    on_gpu: bool,
    precision: str,
    quant: str,
    grad_ckpt: float,
    scaling: tuple[float, str],
) -> TimeEstimate:
    """The time of one optimizer step of `flops_per_step` on `gpus` GPUs named `device_name`, at the measured
    MFU of this kind of run and the strategy's `scaling` (per-GPU share, what measured it). `grad_ckpt`: the share
    of the decoder layers checkpointed; between none and all the busy share is taken in proportion."""

    def none(why: str) -> TimeEstimate:
        return TimeEstimate(flops_per_step, None, "", [why])

    if not on_gpu:
        return none(
            "not estimated on the CPU: the rates were measured on GPUs; a CPU's depends on its cores and its load"
        )
    if device_name is None:
        return none(
            "not estimated: this host has no GPU to name (the run's nodes' GPUs are unknown here); "
            "preview on one of them"
        )
    peak = gpu_peak(device_name)
    if peak is None:
        return none(
            f"not estimated: no bf16 peak known for {device_name!r} (known: "
            f"{', '.join(short for _, short, _ in BF16_PEAK_TFLOPS)})"
        )
    if precision != HALF:
        return none(f"not estimated: the rates were measured in {HALF}, and this run computes in {precision}")
    short, tflops = peak
    rate = _rate("nf4" if quant == "nf4" else "bf16", float(grad_ckpt))
    share, scaled_by = scaling
    per_second = tflops * 1e12 * MATMUL_SHARE * rate.utilisation * gpus * share
    busy = (
        f"{rate.utilisation:.0%} of that busy ({rate.mfu:.0%} MFU)"
        if rate.mfu != rate.utilisation
        else f"{rate.mfu:.0%} MFU"
    )
    basis = [
        (
            f"{tflops:g} TFLOP/s bf16 peak ({short}) x {MATMUL_SHARE:.0%} reached by bf16 matmuls x {busy}, "
            f"measured for {rate.what} on {MEASURED_ON}"
        )
    ]
    if gpus > 1 or share != 1:
        basis.append(f"x {gpus} GPUs x {share:.0%} each ({scaled_by})")
    return TimeEstimate(flops_per_step, flops_per_step / per_second, f"{gpus} x {short}", basis)


def duration(seconds: float) -> str:
    """'45 s', '2 min 5 s', '12 min', '1 h 50 min', '3 d 4 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def scientific(x: float) -> str:
    """3.2e18, not 3.20e+18."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"
