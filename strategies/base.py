"""What a distributed strategy is: the one interface the schema, the run plan, the launcher, the preview and the
trainer ask, so that none of them compares strategy names or ZeRO stages.

A strategy answers from the config (`cfg`, the composed tree) and the run plan (`plan`: world size, nodes,
precision, GPU or CPU). It sits under the schema: it refuses with problems (one line each, naming the key) that
the caller raises as ConfigError, and never imports torch or DeepSpeed at module level, so the launcher and the
preview stay light. The defaults here are plain data parallel's: every process holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryTerms:
    """Bytes one device holds for what the strategy shards: the frozen base weights, the LoRA adapters with their
    gradients, and the optimizer state."""

    weights: float
    lora: float
    optimizer: float


class Strategy:
    """One strategy family (a `distributed.strategy` value); conf/distributed/*.yaml name it and set its keys."""

    name = ""  # the distributed.strategy value
    # (module, extra) the strategy needs installed: `pip install 'lora-launch[extra]'`
    needs: tuple[str, str] | None = None
    # the ranks shard the model themselves before the optimizer is built; accelerate then wraps the optimizer alone
    shards_model_itself = False

    # ---- what it refuses ----------------------------------------------------------------------------

    def problems(self, cfg) -> list[str]:
        """What this strategy cannot run in `cfg`, found when the config is composed (one line each)."""
        d, name, found = cfg.distributed, cfg.distributed.name, []
        if d.keep_gathered not in ("auto", 0):
            found.append(
                f"distributed.keep_gathered={d.keep_gathered} with distributed={name}: only fsdp2 gathers "
                "shard groups; use distributed=fsdp2, or leave distributed.keep_gathered=auto"
            )
        if d.replicate not in ("auto", 1):
            found.append(
                f"distributed.replicate={d.replicate} with distributed={name}: only fsdp2 shards within "
                "copies of the model; use distributed=fsdp2, or leave distributed.replicate=auto"
            )
        return found

    def launch_problems(self, cfg, plan) -> list[str]:
        """What this strategy cannot run on the launch's shape or this installation, found before any process
        starts (and again by each rank)."""
        return []

    # ---- what it does to the model ------------------------------------------------------------------

    def shards_weights(self, cfg) -> bool:
        """Whether no process holds the base weights whole (each a shard): forwards are collectives."""
        return False

    def places_weights(self, cfg) -> bool:
        """Whether the framework itself places (and shards) the base weights, rather than the loader."""
        return False

    def compile_on_gpu(self, cfg) -> str:
        """What train.compile=auto is on GPUs: `layers`, or `loss` where dynamo cannot trace the layers."""
        return "layers"

    def loads_from_rank0(self, cfg, plan) -> bool:
        """Whether rank 0 alone reads the base weights and sends every rank its shards."""
        return False

    def gathers_whole_layers(self, cfg) -> bool:
        """Whether each decoder layer's weights are gathered in one go (DeepSpeed's leaf modules)."""
        return False

    def decides_gathers_after_first_step(self, cfg) -> bool:
        """Whether the ranks decide after their first step how many shard groups stay gathered."""
        return False

    # ---- the files of a launch ----------------------------------------------------------------------

    def accelerate_settings(self, multi: bool, deepspeed_file: str | None) -> dict:
        """accelerate's config keys for this strategy (appended to the run's)."""
        # MULTI_GPU is accelerate's name for "start processes with torchrun"; on CPU they use gloo
        return {"distributed_type": "MULTI_GPU" if multi else "NO"}

    def deepspeed_config(self, cfg, plan) -> dict | None:
        """The DeepSpeed JSON of the run (RUN/ds_config.json, the user's own laid under it); None without DeepSpeed."""
        return None

    def shown_files(self, cfg, plan) -> dict[str, tuple[str, dict]]:
        """Files written to the run dir to show what the ranks apply: {key: (file name, JSON content)}."""
        return {}

    # ---- words and numbers for the preview and the log ----------------------------------------------

    def label(self, plan) -> str:
        """The strategy in a word or two: DDP, ZeRO-3, FSDP2."""
        return "DDP"

    def describe(self, cfg, plan) -> str:
        """The strategy as the preview's launch line names it."""
        return self.label(plan)

    def running(self, distributed_type: str, processes: int, plan) -> str:
        """How the started processes run, from accelerate's distributed type ("" for one plain process)."""
        return "DDP" if distributed_type in ("MULTI_CPU", "MULTI_GPU") else ""

    def memory(self, cfg, plan, weights: float, lora_params: int, gathered: Callable[..., float]) -> MemoryTerms:
        """Per-device bytes of the base `weights` (whole, as stored), the LoRA adapters (fp32) with their
        gradients, and AdamW's state (8 bytes per adapter parameter). `gathered(per_group, prefetch, kept)`: the
        base weights a layer-sharding strategy holds gathered at its peak."""
        lora = lora_params * 4.0
        return MemoryTerms(weights, lora + lora_params * 4.0, lora_params * 8.0)

    def preview_lines(self, cfg, plan, layers: int, layer_bytes: float, gib: Callable[[float], str]) -> list[str]:
        """The preview's lines about how the model is cut (`layers` decoder layers of `layer_bytes` each)."""
        return []

    def scaling(self, cfg, plan) -> tuple[float, str]:
        """Each GPU's tokens/s under this strategy at the plan's world size, as a share of one GPU alone under
        plain data parallel, and what measured it (bench/README.md): the preview's time estimate scales by it."""
        if plan.world_size == 1:
            return 1.0, "one GPU"
        return 0.88, "DDP on 4 GPUs of one host against one GPU; more GPUs or nodes not measured"
