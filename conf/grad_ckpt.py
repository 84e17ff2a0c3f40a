"""`train.grad_ckpt`: how many decoder layers recompute their activations in backward instead of keeping them.

One of: `false` (none), `true` (every layer), a number N (the first N decoder layers, in forward order; the rest
keep theirs), a memory budget such as `20GiB` or `512MiB` (what the decoder layers' activations of one micro-batch
may use: as many layers keep theirs as it holds), or `auto` (as many as the GPU's free memory holds at the start;
none on CPU). Checkpointing the first layers rather than the last costs the least at the peak: their recompute
runs at the end of backward, after the kept layers' activations are freed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNITS = {"gib": 2**30, "mib": 2**20}
TYPE = "bool|int|GiB|auto"  # how the help and the key reference name the type


@dataclass(frozen=True)
class GradCkpt:
    """A train.grad_ckpt value, read."""

    kind: str  # "none", "all", "layers" (the first `layers`), "memory" (`budget` bytes) or "auto"
    layers: int = 0
    budget: float = 0.0

    @property
    def on(self) -> bool:
        """Whether any layer may be checkpointed (checkpointing is set up on the model)."""
        return self.kind != "none"

    def checkpointed(self, layers: int) -> int | None:
        """How many of `layers` decoder layers this value checkpoints, where that follows from it alone (None for
        a budget or auto: it depends on the memory model)."""
        if self.kind in ("memory", "auto"):
            return None
        return {"none": 0, "all": layers}.get(self.kind, min(self.layers, layers))


def read(value) -> GradCkpt:
    """The setting `value` (as the config holds it) stands for; ValueError naming the key where it is none."""
    if isinstance(value, bool):
        return GradCkpt("all" if value else "none")
    if isinstance(value, int) and value >= 0:
        return GradCkpt("layers", layers=value) if value else GradCkpt("none")
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return GradCkpt("auto")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|mib)", text)
        if m and float(m.group(1)) > 0:
            return GradCkpt("memory", budget=float(m.group(1)) * UNITS[m.group(2)])
    raise ValueError(
        f"train.grad_ckpt={value!r} must be true, false, a number of decoder layers to checkpoint (0 or more), "
        "a memory budget for the activations (such as 20GiB or 512MiB) or auto"
    )
