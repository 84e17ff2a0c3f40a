"""`model.attn_implementation=sdpa_varlen`: sdpa, except that packed rows run torch's variable-length
flash-attention kernel over their sample boundaries.

Under plain sdpa a packed row needs an explicit block-diagonal mask, and a mask rules out sdpa's causal
flash kernel: every row then pays for attention across its whole width, sample boundaries or not. Here the
packed batch goes through the model as one flattened row with `cu_seq_lens_q/k` and `max_length_q/k`
(transformers' flash-attention arguments, which it passes to the attention function untouched), and
`torch.nn.attention.varlen.varlen_attn` computes causal attention within each sample only. Nothing but torch
is needed (no flash-attn build).

Everything else is sdpa's: batches that are not packed, generation with a cache and the masks for them
(the mask function is sdpa's). On the CPU, which has no varlen kernel, and in sliding-window layers, packed
rows run sdpa with the same boundaries as a block-diagonal mask, so the CPU tests check the same inputs the
GPU kernel gets. It is the default: unpacked, it is sdpa to the bit (tests/unit/test_packing.py).
"""

from __future__ import annotations

import inspect
import math

import torch

from lora_launch.conf.schema import SDPA_VARLEN as VARLEN
from lora_launch.train.data import same_sample_causal_mask


def register() -> None:
    """Make `sdpa_varlen` an attn_implementation transformers accepts (idempotent; before any model is built)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    global _KERNEL
    _KERNEL = _find_kernel()  # looked up once, not in the (compiled) layers
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
):
    """transformers' attention interface: query (1, heads, tokens, dim) of a flattened packed batch when
    cu_seq_lens_q is given, else any batch sdpa takes. Returns (batch, tokens, heads, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1 or dropout or kwargs.get("softcap") is not None:
        raise ValueError(
            f"{VARLEN}: packed rows are one flattened row of attention without dropout or softcap "
            f"(got a batch of {query.shape[0]}, dropout {dropout}, softcap {kwargs.get('softcap')}); "
            "use model.attn_implementation=eager for this model"
        )
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    window = kwargs.get("sliding_window")
    if q.is_cuda and _KERNEL is not None and window is None:
        out = _flash(q, k, v, cu_seq_lens_q, int(max_length_q), scaling)
    else:  # a sliding window's layers (Mistral-style) take the mask with the window in it
        out = _masked(q, k, v, cu_seq_lens_q, scaling, window)
    return out.unsqueeze(0), None


_KERNEL = None


def _find_kernel():
    """torch's varlen_attn and the keywords this torch's version of it takes (None where it has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash(q, k, v, cu: torch.Tensor, longest: int, scaling: float | None) -> torch.Tensor:
    varlen_attn, takes = _KERNEL
    kwargs = {}
    if "window_size" in takes:  # torch >= 2.12 says causal as a window reaching no token to the right
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if scaling is not None:
        if "scale" in takes:
            kwargs["scale"] = scaling
        else:  # the kernel scales by 1/sqrt(dim): fold the rest into the query
            q = q * (scaling * math.sqrt(q.shape[-1]))
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in takes:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


def _masked(q, k, v, cu: torch.Tensor, scaling: float | None, window: int | None = None) -> torch.Tensor:
    """The same attention with sdpa and a block-diagonal causal mask built from cu (the CPU, which has no
    varlen kernel, and sliding-window layers: token q then sees the `window` tokens up to itself)."""
    allowed = same_sample_causal_mask(cu, torch.Size((1, q.shape[0])), q.device)[0, 0]
    if window is not None:
        allowed &= torch.ones_like(allowed).triu(1 - window)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, tokens, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, scale=scaling, enable_gqa=k.shape[0] != q.shape[0]
    )
    return out.transpose(0, 1)
