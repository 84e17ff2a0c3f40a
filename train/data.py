"""Reading, templating and tokenising the data, and the resumable sample stream.

The training data is one endless stream of samples: epoch e is a permutation of the training
set drawn from (seed, e), and stream position p is sample p % N of epoch p // N. A run's data
position is just p (a global sample index), so resuming means "continue at p" — with any world
size — instead of replaying and skipping batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

IGNORE = -100


class DataError(ValueError):
    """Data that cannot be used; the message names the file, line or field."""


# ---- reading and templating -------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def load_records(cfg: DictConfig) -> list[dict]:
    """The raw records (dicts) of the configured dataset."""
    d = cfg.data
    if d.source in ("demo", "local"):
        path = Path(d.path)
        if not path.exists():
            raise DataError(f"data.path={path}: file not found")
        rows = _read_jsonl(path)
    else:
        import datasets

        rows = list(datasets.load_dataset(d.path, split=d.split))
    if d.max_samples > 0:
        rows = rows[: d.max_samples]
    if not rows:
        raise DataError(f"data.path={d.path}: no samples")
    return rows


def render(cfg: DictConfig, row: dict) -> tuple[str, str]:
    """(prompt, response) text of one record under the configured format and template."""
    d = cfg.data
    if d.format == "text":
        if d.text_field not in row:
            raise DataError(f"data.text_field={d.text_field!r} not in sample; fields: {sorted(row)}")
        return "", row[d.text_field]
    for key in ("instruction", "output"):
        if key not in row:
            raise DataError(f"instruction format needs field {key!r}; fields: {sorted(row)}")
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return f"[INST] {user} [/INST] ", row["output"]


def tokenize(tok, prompt: str, response: str, seq_len: int, train_on_prompt: bool) -> dict:
    """input_ids and labels of one sample: bos + prompt + response + eos, prompt masked."""
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [tok.bos_token_id]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + r)[:seq_len]
    labels = (p if train_on_prompt else [IGNORE] * len(p)) + r
    return {"input_ids": ids, "labels": labels[:seq_len]}


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]


def build_splits(cfg: DictConfig, tok) -> Splits:
    """Tokenised train and validation samples; the validation split is drawn by `seed`."""
    rows = load_records(cfg)
    samples = [tokenize(tok, *render(cfg, row), cfg.train.seq_len, cfg.data.train_on_prompt) for row in rows]
    samples = [s for s in samples if any(l != IGNORE for l in s["labels"][1:])]
    if not samples:
        raise DataError(f"data.path={cfg.data.path}: every sample is empty after truncation to train.seq_len={cfg.train.seq_len}")
    order = np.random.default_rng(cfg.seed).permutation(len(samples))
    n_val = int(round(len(samples) * cfg.data.val_split))
    val = [samples[i] for i in order[:n_val]]
    train = [samples[i] for i in sorted(order[n_val:])]
    return Splits(train=train, val=val)


# ---- the resumable stream ---------------------------------------------------------------------

class SampleStream:
    """Maps a global sample index to a training-set index: epoch-wise permutations by seed."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, None

    def index(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return int(self._perm[position % self.size])


def micro_batch_positions(start: int, micro: int, accum: int, world: int, rank: int, k: int) -> range:
    """Stream positions of micro-batch k (of `accum`) of `rank` in the optimizer step starting at `start`.

    One optimizer step consumes micro * accum * world consecutive positions; micro-batch k of
    every rank comes before micro-batch k + 1 of any rank.
    """
    first = start + (k * world + rank) * micro
    return range(first, first + micro)


def collate(samples: list[dict], pad_id: int, multiple_of: int = 8) -> dict:
    """Right-pad a list of samples into tensors; padding is masked out of attention and loss."""
    longest = max(len(s["input_ids"]) for s in samples)
    width = -(-longest // multiple_of) * multiple_of
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
