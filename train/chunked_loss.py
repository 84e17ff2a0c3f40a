"""train.chunked_loss: the output head and the cross-entropy over chunks of tokens, never the whole micro-batch's
logits at once.

The plain loss holds the logits of every token of the micro-batch (vocab wide: 32000 for Llama-2, 128k for
Llama-3), their float32 upcast and its gradient: the largest single activation of a LoRA step once the decoder
layers are checkpointed. Here the causal LM's own forward still runs (every wrapper's hooks with it: DDP, ZeRO-3's
gathers, FSDP2's root group), but its output head, given the labels beforehand, returns the summed loss instead of
the logits. An autograd Function computes each chunk's logits, loss and correct predictions and keeps none of them;
backward computes each chunk's logits again and takes the gradient of the same loss through them (the head's
weight is frozen under LoRA, so the hidden states' gradient is all there is to return, the weight's too where it
trains). Each chunk's logits are about the size of the hidden states (lora_launch.run.activations.loss_chunks).

A head that is not a plain linear layer (a LoRA or 4-bit one), or a model that scales or caps its logits, keeps
the plain loss.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F

from lora_launch.data.samples import IGNORE
from lora_launch.run.activations import loss_chunks


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (tokens, vocab) logits against each token's target (IGNORE: left out), in float32
    as the plain loss computes it."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Each position's target: the next label in its row, IGNORE at a row's end; flattened (batch x seq)."""
    ends = torch.full_like(labels[:, :1], IGNORE)
    return torch.cat([labels[:, 1:], ends], dim=1).flatten()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """(summed loss, correct top predictions) of `hidden` (tokens, h) through the head (`weight`, `bias`)
    against `targets`, `size` tokens at a time; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, size, ce):
        device = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for h, t in zip(hidden.split(size), targets.split(size), strict=True):
            logits = F.linear(h, weight, bias)
            loss = loss + ce(logits, t)
            hits = hits + ((logits.argmax(-1) == t) & (t != IGNORE)).sum()
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.size, ctx.ce = size, ce
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, grad_loss, _grad_hits):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        device = hidden.device.type
        enabled, dtype = ctx.autocast
        for h, t, gh in zip(
            hidden.split(ctx.size),
            targets.split(ctx.size),
            grad_h.split(ctx.size) if need_h else [None] * math.ceil(len(hidden) / ctx.size),
            strict=True,
        ):
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                h = h.detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                b = bias.detach().requires_grad_(need_b) if bias is not None else None
                loss = ctx.ce(F.linear(h, w, b), t)
            wanted = [x for x, need in ((h, need_h), (w, need_w), (b, need_b)) if need]
            grads = list(torch.autograd.grad(loss, wanted, grad_loss))
            if need_h:
                gh.copy_(grads.pop(0))
            if need_w:
                grad_w += grads.pop(0)
            if need_b:
                grad_b += grads.pop(0)
        return grad_h, grad_w, grad_b, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunks: int, ce
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, correct top predictions) of the head over `hidden` (tokens, h) in `chunks` chunks."""
    size = max(1, math.ceil(hidden.shape[0] / max(chunks, 1)))
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, size, ce)


def head_refusal(model) -> str | None:
    """Why this (PEFT) causal LM's output head cannot compute the loss in chunks, or None where it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain linear layer"
    text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for scaled in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(text, scaled, None) not in (None, 1, 1.0):
            return f"the model scales or caps its logits ({scaled})"
    return None


class ChunkedLoss:
    """The loss of a model whose output head computes it in chunks; `forward_loss_sum` runs the model inside
    `labels(...)` and reads the loss where the logits were, and the correct predictions from `hits`."""

    def __init__(self, model, ce):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = base.get_output_embeddings()
        text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.chunks = loss_chunks(text.hidden_size, text.vocab_size)
        self.ce = ce
        self._targets = None
        self.hits = None
        plain = self.head.forward

        def forward(head, hidden):
            if self._targets is None:  # generation, or a caller that wants the logits
                return plain(hidden)
            flat = hidden.reshape(-1, hidden.shape[-1])  # packed rows run as one row of the batch's tokens
            loss, self.hits = chunked_cross_entropy(flat, head.weight, head.bias, self._targets, self.chunks, self.ce)
            return loss

        self.head.forward = types.MethodType(forward, self.head)

    @contextlib.contextmanager
    def labels(self, labels: torch.Tensor):
        """Within: the head returns the summed loss of its input against `labels` (unshifted, batch x seq)."""
        self._targets = next_tokens(labels)
        try:
            yield
        finally:
            self._targets = None


def install(model, ce) -> ChunkedLoss | None:
    """Have the model's output head compute the loss in chunks (`ce`: the summed cross-entropy of a chunk's
    logits); None where the head cannot (head_refusal)."""
    return None if head_refusal(model) else ChunkedLoss(model, ce)
