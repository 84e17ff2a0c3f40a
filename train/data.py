"""The resumable sample stream and the batches a rank trains on.

The training data (built by `lora_launch.data.samples`) is one endless stream of samples (packed
rows, when packing): epoch e is a permutation of the training set drawn from (seed, e), and stream
position p is sample p % N of epoch p // N. A run's data position is just p (a global sample index),
so resuming means "continue at p" — with any world size — instead of replaying and skipping batches.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from lora_launch.conf.schema import SDPA_VARLEN
from lora_launch.data.samples import IGNORE, Splits

__all__ = ["SampleStream", "train_stream", "micro_batch_positions", "collate", "model_inputs"]


# ---- the resumable stream -------------------------------------------------------------------------


class SampleStream:
    """Maps a global sample index to a training-set index: epoch-wise permutations by seed.

    With `lengths` and `group_size` (data.group_by_length), each run of `group_size` positions
    of an epoch's permutation is sorted longest first, so micro-batches hold samples of similar
    length; the mapping stays a pure function of (seed, position).
    """

    def __init__(self, size: int, seed: int, lengths: np.ndarray | None = None, group_size: int = 0):
        self.size, self.seed = size, seed
        self.lengths, self.group_size = lengths, group_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        if self.lengths is not None and self.group_size > 1:
            for lo in range(0, self.size, self.group_size):
                chunk = perm[lo : lo + self.group_size]
                perm[lo : lo + self.group_size] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
        return perm

    def index(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self._permutation(epoch)
        return int(self._perm[position % self.size])


def train_stream(cfg: DictConfig, splits: Splits) -> SampleStream:
    """The stream over splits.train for this config (length-grouped with data.group_by_length)."""
    train = splits.train
    if not cfg.data.group_by_length:
        return SampleStream(len(train), cfg.seed)
    # 50 micro-batches' worth of samples per group, as transformers' LengthGroupedSampler; not
    # scaled by the world size, so a resume on another world size sees the same order
    group = 50 * cfg.train.micro_batch_size * cfg.train.grad_accum
    return SampleStream(len(train), cfg.seed, lengths=train.lengths, group_size=group)


def micro_batch_positions(start: int, micro: int, accum: int, world: int, rank: int, k: int) -> range:
    """Stream positions of micro-batch k (of `accum`) of `rank` in the optimizer step starting at `start`.

    One optimizer step consumes micro * accum * world consecutive positions; micro-batch k of
    every rank comes before micro-batch k + 1 of any rank.
    """
    first = start + (k * world + rank) * micro
    return range(first, first + micro)


def collate(samples: list[dict], pad_id: int, multiple_of: int = 8) -> dict:
    """Right-pad a list of samples into tensors; padding is masked out of attention and loss.

    Packed rows also get position_ids (restarting at every sample) and their sample boundaries:
    cu_seq_lens, the cumulative lengths of the samples of all rows laid end to end (int32, rows *
    width in all), and max_length, the longest of them (a Python int, so the attention kernels
    never wait for the device to learn it). A row's padding counts as one more sample, with
    positions of its own, that nothing else attends to.
    """
    longest = max(len(s["input_ids"]) for s in samples)
    width = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    packed = "seq_lens" in samples[0]
    positions = torch.zeros((len(samples), width), dtype=torch.long) if packed else None
    segments = []
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.as_tensor(s["input_ids"])
        labels[i, :n] = torch.as_tensor(s["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.as_tensor(s["position_ids"])
            positions[i, n:] = torch.arange(width - n)
            segments += [*s["seq_lens"].tolist(), *([width - n] if width > n else [])]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if packed:
        batch["position_ids"] = positions
        batch["cu_seq_lens"] = torch.tensor(np.concatenate([[0], np.cumsum(segments)]), dtype=torch.int32)
        batch["max_length"] = int(max(segments))
    return batch


def model_inputs(batch: dict, attention: str = "sdpa", dtype: torch.dtype = torch.float32) -> dict:
    """The model's forward arguments for a collated batch, for a model whose attn_implementation is
    `attention` (`dtype`: its activations', for eager's additive mask).

    Packed rows pass their sample boundaries explicitly, in the form transformers takes for that
    attention: flash-attention kernels and sdpa_varlen (lora_launch.train.attention) get the rows as one
    flattened sequence with cu_seq_lens_q/k and max_length_q/k (variable-length attention; the logits come
    back as one row); sdpa a boolean
    block-diagonal causal mask, eager the same as an additive one, flex_attention a BlockMask (each
    4D mask is used as given). Position ids restart at each sample for the rotary embeddings.
    An attention transformers maps to none of these gets position ids alone, from which it infers
    the boundaries itself. use_cache=False: with a cache transformers would ignore the boundaries.
    """
    if "cu_seq_lens" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        eager_mask,
        flash_attention_mask,
        flex_attention_mask,
        sdpa_mask,
    )

    ids, positions = batch["input_ids"], batch["position_ids"]
    kind = ALL_MASK_ATTENTION_FUNCTIONS.get(attention)
    if kind is flash_attention_mask or attention == SDPA_VARLEN:
        cu, longest = batch["cu_seq_lens"], batch["max_length"]
        flat = {
            "input_ids": ids.view(1, -1),
            "position_ids": positions.view(1, -1),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
            "use_cache": False,
        }
        if attention == SDPA_VARLEN:  # an all-ones mask: sdpa's mask function then builds none (nor infers one)
            flat["attention_mask"] = torch.ones_like(flat["input_ids"])
        return flat
    inputs = {"input_ids": ids, "position_ids": positions, "use_cache": False}
    boundaries = (batch["cu_seq_lens"], ids.shape, ids.device)
    if kind is sdpa_mask:
        inputs["attention_mask"] = same_sample_causal_mask(*boundaries)
    elif kind is eager_mask:
        allowed = same_sample_causal_mask(*boundaries)
        inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )
    elif kind is flex_attention_mask:
        inputs["attention_mask"] = same_sample_block_mask(*boundaries)
    return inputs


def sample_ids(cu_seq_lens: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """`shape` (rows, width): which sample each token of the batch belongs to (a row's padding is one of its
    own), from the batch's cu_seq_lens, on `device`."""
    first = torch.zeros(shape.numel(), dtype=torch.int32, device=device)
    first[cu_seq_lens[:-1].long()] = 1
    return first.cumsum(0).view(shape)


def same_sample_causal_mask(cu_seq_lens: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(rows, 1, width, width) boolean: token q attends to token k when both are in one sample, k <= q."""
    sample = sample_ids(cu_seq_lens, shape, device)
    width = sample.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=sample.device).tril()
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]


def same_sample_block_mask(cu_seq_lens: torch.Tensor, shape: torch.Size, device: torch.device):
    """The same pattern as same_sample_causal_mask as a flex-attention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    sample = sample_ids(cu_seq_lens, shape, device)
    rows, width = sample.shape

    def same_sample_causal(b, h, q, k):
        return (sample[b, q] == sample[b, k]) & (q >= k)

    return create_block_mask(same_sample_causal, rows, None, width, width, device=sample.device)
