"""quant.kernel=torch: the frozen 4-bit base layers' matmul as torch operations, so that torch.compile fuses
the NF4 dequantisation into each compiled decoder layer's graph.

bitsandbytes' `matmul_4bit` dequantises each weight through its own library call, twice for the nested
absmax and the 4-bit codes, every forward, recompute and backward: the host's kernel launches, not the GPU,
then set the step's pace (bench/README.md, "bitsandbytes' 4-bit matmul"). Here the
same arithmetic is written in torch operations (two table lookups and two scalings in float32, then the
cast, as bitsandbytes computes them: bit-identical weights), and an autograd function keeps only the
packed weight for backward, where it dequantises again (the bf16 weight is never saved).

Only the weights bitsandbytes packed (`Params4bit` with a quant_state) of a model that each process holds
whole (ddp) take this path; the storage stays bitsandbytes', so saving, loading and the adapters are
unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    blocksize2: int,
    offset: torch.Tensor | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight bitsandbytes packed as NF4 (`packed`: two codes a byte, the first in the high nibble), in
    `dtype`. With double quantisation `absmax` holds 8-bit codes of the per-block scales, scaled per
    `blocksize2` blocks by `absmax2` and shifted by `offset`."""
    n = shape[0] * shape[1]
    b = packed.reshape(-1).view(torch.uint8)
    codes = torch.stack((b >> 4, b & 15), dim=-1).reshape(-1)[:n].long()
    if absmax2 is not None:
        block = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        scale = code2[absmax.long()] * absmax2[block] + offset
    else:
        scale = absmax.float()
    element_block = torch.arange(n, device=packed.device) // blocksize
    return (code[codes] * scale[element_block]).reshape(shape).to(dtype)


class _Matmul4bit(torch.autograd.Function):
    """x @ W.T for a frozen NF4 weight W: saves the packed weight, dequantises again for the input gradient."""

    @staticmethod
    def forward(ctx, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, shape, dtype):
        ctx.save_for_backward(packed, absmax, code, absmax2, code2, offset)
        ctx.spec = (blocksize, blocksize2, shape, dtype)
        return F.linear(
            x, dequantize(packed, absmax, code, blocksize, absmax2, code2, blocksize2, offset, shape, dtype)
        )

    @staticmethod
    def backward(ctx, grad):
        packed, absmax, code, absmax2, code2, offset = ctx.saved_tensors
        blocksize, blocksize2, shape, dtype = ctx.spec
        w = dequantize(packed, absmax, code, blocksize, absmax2, code2, blocksize2, offset, shape, dtype)
        return (grad @ w, *[None] * 10)


def _forward(module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit forward (input in the compute dtype, output in the input's) through
    `_Matmul4bit`, from the plain tensors `use_torch_matmul` registered (which dynamo traces as buffers)."""
    dtype = module.nf4_dtype
    out = _Matmul4bit.apply(
        x.to(dtype),
        module.nf4_packed,
        module.nf4_absmax,
        module.nf4_code,
        module.nf4_absmax2,
        module.nf4_code2,
        module.nf4_offset,
        module.nf4_blocksize,
        module.nf4_blocksize2,
        module.nf4_shape,
        dtype,
    )
    if module.bias is not None:
        out = out + module.bias.to(dtype)
    return out.to(x.dtype)


def use_torch_matmul(model, compute_dtype: torch.dtype) -> int:
    """Route every NF4 linear layer bitsandbytes packed in `model` through `_forward`; returns how many. The
    packed weight and its statistics become non-persistent buffers (views, no copies: nothing more is saved
    or held)."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        st = getattr(getattr(module, "weight", None), "quant_state", None)
        if not isinstance(module, bnb.nn.Linear4bit) or st is None or st.quant_type != "nf4":
            continue
        nested = bool(st.nested)
        buffers = {
            "packed": module.weight.data.view(torch.uint8),
            "absmax": st.absmax,
            "code": st.code,
            "absmax2": st.state2.absmax if nested else None,
            "code2": st.state2.code if nested else None,
            "offset": torch.as_tensor(st.offset, dtype=torch.float32, device=st.absmax.device) if nested else None,
        }
        for name, tensor in buffers.items():
            module.register_buffer(f"nf4_{name}", tensor, persistent=False)
        module.nf4_blocksize, module.nf4_blocksize2 = int(st.blocksize), int(st.state2.blocksize) if nested else 0
        module.nf4_shape, module.nf4_dtype = tuple(st.shape), module.compute_dtype or compute_dtype
        module.forward = _forward.__get__(module)
        count += 1
    return count
