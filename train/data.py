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
                chunk = perm[lo: lo + self.group_size]
                perm[lo: lo + self.group_size] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
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

    Packed rows also get position_ids; their padding gets positions of its own (restarting at
    0), so it reads as one more sample that nothing attends to.
    """
    longest = max(len(s["input_ids"]) for s in samples)
    width = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    packed = "position_ids" in samples[0]
    positions = torch.zeros((len(samples), width), dtype=torch.long) if packed else None
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.as_tensor(s["input_ids"])
        labels[i, :n] = torch.as_tensor(s["labels"])
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.as_tensor(s["position_ids"])
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if packed:
        batch["position_ids"] = positions
    return batch


def model_inputs(batch: dict) -> dict:
    """The model's forward arguments for a collated batch.

    Packed rows pass position_ids and no attention mask: transformers then builds a
    block-diagonal causal mask from where the positions restart (sdpa, eager), and
    flash-attention 2 uses them as variable-length boundaries. It does so only without a KV
    cache (transformers 5.24), hence use_cache=False: with a cache, samples would see each other.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
