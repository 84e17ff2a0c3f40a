"""The floating dtypes a config names, in torch's words, and what each is elsewhere: accelerate's mixed_precision
and the bytes of one element. The schema's choices, the run plan (precision, `auto`), the accelerate and DeepSpeed
files, the preview's memory model and the torch dtypes training builds all read this one table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Float:
    bytes: int  # of one element
    mixed_precision: str  # accelerate's name for training that computes in it ("no": full precision)


FLOATS = {"bfloat16": Float(2, "bf16"), "float16": Float(2, "fp16"), "float32": Float(4, "no")}
PACKED = "uint8"  # the 4-bit weights' default storage: two to a byte
HALF, FULL = "bfloat16", "float32"  # what `auto` picks: the half precision GPUs train in, and full precision


def compute_precision(asked: str, bf16: bool) -> str:
    """train.precision as trained: `auto` is bfloat16 where the hardware has it, else float32."""
    return asked if asked in FLOATS else HALF if bf16 else FULL


def weight_dtype(asked: str, precision: str) -> str:
    """model.dtype as loaded: `auto` holds the frozen base in bfloat16 when training computes in it, else float32."""
    return asked if asked in FLOATS else HALF if precision == HALF else FULL


def torch_dtype(name: str):
    """The torch dtype of a name above (FLOATS or PACKED); torch is imported only here, when asked."""
    import torch

    if name not in (*FLOATS, PACKED):
        raise KeyError(name)
    return getattr(torch, str(name))
