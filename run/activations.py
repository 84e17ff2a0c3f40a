"""What backward keeps of one micro-batch, and how many decoder layers train.grad_ckpt checkpoints: the one
activation memory model that the preview's estimate and the trainer's choice (a budget, `auto`) both read.

Per token and decoder layer a layer keeps each norm's input and output (4h), q (h), k and v (2 kv, the key/value
width under grouped-query attention), the attention output (h), and the MLP's gate, up and activated gate (3i), in
the activation dtype (attention through a fused kernel: no seq^2 term); a compiled decoder layer keeps 3h + 2kv +
3i, its norms recomputed in backward. A checkpointed layer keeps its input alone (h) and recomputes the rest when
backward reaches it. The first layers are the ones checkpointed: their recompute comes at the end of backward, after
the kept layers' activations are freed, so the peak is the larger of what the start of backward holds (every
checkpointed layer's input, every kept layer's activations) and what one recompute adds to the inputs.

A compiled decoder layer of 4-bit weights dequantised by torch operations (quant.kernel=torch) also keeps each
linear's dequantised weight for backward, in the compute dtype: the compiler merges backward's dequantisation with
forward's and saves its result (eager saves the packed weight alone). That is a layer's linear weights at 2 bytes
each, kept by every layer not recomputed and by the one being recomputed.

The loss keeps the logits: vocab x 10 bytes per token (half-precision logits, their float32 upcast and its
gradient), for the whole micro-batch, or for one chunk of tokens with train.chunked_loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_launch.conf.dtypes import FLOATS
from lora_launch.conf.schema import quant_kernel

GIB = 2**30
HEADROOM = 0.9  # grad_ckpt=auto: the share of the GPU memory this process can reach that it plans to use
MARGIN = 1 * GIB  # and what it leaves besides: gathered weights, matmul workspaces, the allocator's slack
LOGIT_BYTES = 10  # per token and vocabulary entry: half-precision logits, their float32 upcast and its gradient


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one micro-batch leaves for backward in each decoder layer: all of them (`kept`), or the layer's
    input alone (`checkpointed`)."""

    layers: int
    kept: float
    checkpointed: float

    def total(self, checkpointed: int) -> float:
        """The decoder layers' activations at backward's peak with the first `checkpointed` layers recomputed."""
        n = max(0, min(checkpointed, self.layers))
        if n == 0:
            return self.layers * self.kept
        return n * self.checkpointed + max((self.layers - n) * self.kept, self.kept - self.checkpointed)

    def checkpointed_within(self, budget: float) -> int:
        """The fewest layers to checkpoint so that the activations fit `budget` bytes (all of them when even that
        does not)."""
        return next((n for n in range(self.layers + 1) if self.total(n) <= budget), self.layers)


def layer_activations(
    layers: int,
    hidden: int,
    kv_hidden: int,
    intermediate: int,
    tokens: int,
    act_bytes: int,
    compiled: bool,
    dequantised: float = 0.0,
) -> LayerActivations:
    """The per-layer terms for a micro-batch of `tokens` tokens (kv_hidden 0: no grouped-query attention), with
    `dequantised` bytes of weights each layer keeps for its backward (:func:`dequantised_bytes`)."""
    kv = kv_hidden or hidden
    kept = tokens * ((3 if compiled else 6) * hidden + 2 * kv + 3 * intermediate) * act_bytes
    return LayerActivations(layers, kept + dequantised, tokens * hidden * act_bytes)


def dequantised_bytes(cfg, plan, linear_params: int) -> float:
    """Bytes of dequantised weights a decoder layer of `linear_params` linear weights keeps for its backward:
    those of a compiled layer of 4-bit weights through the torch kernel; none otherwise."""
    if cfg.quant.mode != "nf4" or plan.compile != "layers" or quant_kernel(cfg) != "torch":
        return 0.0
    return linear_params * FLOATS[str(cfg.quant.compute_dtype)].bytes


def loss_chunks(hidden: int, vocab: int) -> int:
    """How many chunks train.chunked_loss cuts a micro-batch's tokens into: each chunk's logits about the size
    of the hidden states (Liger's rule), so the loss never holds much more than its input."""
    return max(1, math.ceil(vocab / max(hidden, 1)))


def logits_bytes(tokens: int, hidden: int, vocab: int, chunked: bool) -> float:
    """What the loss keeps at its peak: the whole micro-batch's logits, or one chunk's."""
    if chunked:
        tokens = math.ceil(tokens / loss_chunks(hidden, vocab))
    return tokens * vocab * LOGIT_BYTES


def auto_budget(reachable: float, held: float, logits: float) -> float:
    """grad_ckpt=auto: what the decoder layers' activations may use on a GPU where this process can reach
    `reachable` bytes and holds `held` for weights, adapters, gradients and optimizer state, besides the loss's
    `logits`."""
    return HEADROOM * reachable - held - logits - MARGIN
