"""On the GPU: sdpa_varlen's packed-row attention (torch's varlen flash kernel) against sdpa run on each sample
alone, forward and gradients, bf16, with and without grouped KV heads; then the attention of one packed row
timed three ways (forward + backward): varlen, sdpa with the block-diagonal mask plain sdpa needs, and sdpa's
causal kernel over the whole row as if it were one sample (the fixed-length rows' cost).

`python -m bench.varlen_check [--out DIR]` prints a short table and appends JSON lines to DIR/varlen.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_launch.train import attention
from lora_launch.train.attention import varlen_attention


class _Module:  # what transformers' attention functions read off the attention module
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def _segments(width: int, seed: int) -> list[int]:
    """Log-normal sample lengths (median about 170 tokens) filling `width` tokens."""
    rng = np.random.default_rng(seed)
    lengths, left = [], width
    while left > 0:
        n = int(min(left, max(8, rng.lognormal(np.log(170), 0.9))))
        lengths.append(n)
        left -= n
    return lengths


def _qkv(tokens: int, heads: int, kv_heads: int, dim: int = 128, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(1, h, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return [t.requires_grad_() for t in (make(heads), make(kv_heads), make(kv_heads))]


def check(width: int, heads: int, kv_heads: int) -> dict:
    lengths = _segments(width, seed=width + kv_heads)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    q, k, v = _qkv(width, heads, kv_heads)
    grad = torch.randn(1, width, heads, 128, device="cuda", dtype=torch.bfloat16)
    out, _ = varlen_attention(
        _Module(heads // kv_heads), q, k, v, None, scaling=128**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths)
    )
    got = [out.float(), *torch.autograd.grad(out, (q, k, v), grad)]
    pieces = []
    for lo, hi in zip(cu.tolist(), cu.tolist()[1:]):
        pieces.append(
            F.scaled_dot_product_attention(
                q[:, :, lo:hi],
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                is_causal=True,
                scale=128**-0.5,
                enable_gqa=kv_heads != heads,
            )
        )
    ref = torch.cat(pieces, dim=2).transpose(1, 2)
    want = [ref.float(), *torch.autograd.grad(ref, (q, k, v), grad)]
    errors = {
        name: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)
    }
    return {
        "width": width,
        "heads": heads,
        "kv_heads": kv_heads,
        "samples": len(lengths),
        "max_rel_error": errors,
        "ok": all(e < 2e-2 for e in errors.values()),
    }


def _ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def timing(width: int, heads: int = 32) -> dict:
    lengths = _segments(width, seed=width)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    q, k, v = _qkv(width, heads, heads)
    sample = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
    mask = (sample[:, None] == sample[None, :]) & torch.ones(width, width, dtype=torch.bool, device="cuda").tril()

    def varlen():
        out, _ = varlen_attention(
            _Module(1), q, k, v, None, scaling=128**-0.5, cu_seq_lens_q=cu, max_length_q=max(lengths)
        )
        out.sum().backward()

    def masked():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    def causal_row():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return {
        "width": width,
        "samples": len(lengths),
        "varlen_ms": _ms(varlen),
        "sdpa_mask_ms": _ms(masked),
        "sdpa_causal_whole_row_ms": _ms(causal_row),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    attention.register()
    kernel = attention._KERNEL
    head = {
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name(),
        "varlen_attn": None if kernel is None else sorted(kernel[1]),
    }
    print(json.dumps(head))
    rows = [check(w, 32, kv) for w in (512, 4096) for kv in (32, 8)] + [timing(w) for w in (2048, 4096, 16384)]
    with (out / "varlen.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps({**head, **row}) + "\n")
            print(json.dumps(row))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
