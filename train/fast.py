"""The GPU speed path: compiled decoder layers and a compiled loss, behind `train.compile`.

Eager Hugging Face Llama spends a large share of a LoRA step in small memory-bound kernels
(RMSNorm in float32, rotary embeddings, SiLU * up, LoRA dropout/scale/add, residual adds) and
in the loss, which upcasts the whole batch's logits (batch x seq x 32000) to float32 and keeps
a float32 log-softmax for backward. Compiling each decoder layer fuses the small kernels;
compiling the loss fuses the upcast into one reduction that reads bf16 logits once each way.
Identical decoder layers share one compiled graph, so compiling costs one layer's worth of time.
CPU runs resolve `auto` to `none` and keep the plain eager path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError, chunked_loss
from lora_launch.data.samples import IGNORE
from lora_launch.train.chunked_loss import head_refusal, token_cross_entropy_sum
from lora_launch.train.chunked_loss import install as install_chunked_loss


def compile_decoder_layers(model, dynamic: bool | None = None, **options) -> int:
    """Compile every decoder layer in place (before DDP/DeepSpeed wrap the model), with torch.compile's other
    `options` if any (the bench tries `mode`); returns how many."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=dynamic, **options)
    return len(layers)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of (batch, seq, vocab) logits against unshifted labels."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


_compiled = {}


def loss_function(mode: str, per_token: bool = False):
    """The summed cross-entropy to use: compiled unless mode is `none`. `per_token`: of (tokens, vocab) logits
    against each token's target (a chunk of train.chunked_loss), else of (batch, seq, vocab) logits."""
    fn = token_cross_entropy_sum if per_token else cross_entropy_sum
    if mode == "none":
        return fn
    if fn not in _compiled:
        # dynamic: padded batches change the sequence length from step to step (and a last chunk is shorter)
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def deterministic_kernels() -> None:
    """train.deterministic: torch's deterministic algorithms from here on (Inductor follows them), strictly: an
    op without a deterministic form raises rather than warns, because a warning would leave cuDNN's attention
    backward on its atomic adds. cuBLAS repeats itself only with a fixed workspace, set before its first call."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def rule_chosen_reductions() -> None:
    """Have Inductor choose its reduction kernels' block sizes by rule instead of by timing them.

    By default Inductor times several block sizes of each reduction kernel the first time a process meets a
    size and keeps the fastest. The block size sets the order of the sums, so the winner sets the last bits
    of every loss after it, and it depends on what else the GPU was doing at that moment: a resumed process
    meets the sizes anew and may pick another winner, and its losses drift from the uninterrupted run's
    (seen on an H200 as a resume that matched for a dozen steps, then differed). Exact resume needs the
    choice to be the same in every process. TORCHINDUCTOR_DETERMINISTIC=0 in the environment keeps torch's
    own behaviour.
    """
    import torch._inductor.config as inductor

    if "TORCHINDUCTOR_DETERMINISTIC" not in os.environ and hasattr(inductor, "deterministic"):
        inductor.deterministic = True


def apply(cfg: DictConfig, model, mode: str):
    """Apply the speed path `mode` (the plan's reading of `train.compile`) to the PEFT model; returns the
    loss function: a ChunkedLoss where train.chunked_loss has the output head compute it in chunks."""
    loss = loss_function(mode)
    if chunked_loss(cfg):
        chunked = install_chunked_loss(model, loss_function(mode, per_token=True))
        if chunked is None and cfg.train.chunked_loss is True:
            raise ConfigError(f"train.chunked_loss=true: {head_refusal(model)}; set train.chunked_loss=false")
        loss = chunked or loss
    if mode != "none":
        rule_chosen_reductions()
    if mode == "layers":
        compile_decoder_layers(model, dynamic=None if fixed_lengths(cfg) else True)
        # Under DDP, dynamo cuts every graph it compiles at DDP bucket boundaries (the first at
        # 1 MB) so gradient all-reduces can start mid-graph: each decoder layer would become
        # several graphs with unfused seams. The adapters' gradients are small; keep layers whole.
        torch._dynamo.config.optimize_ddp = False
    return loss


def fixed_lengths(cfg: DictConfig) -> bool:
    """Whether every batch has the same shape (full-length synthetic data): static compilation.

    Real data is padded to each batch's longest sample, so its sequence length changes from
    step to step; compiling for dynamic lengths from the start avoids a recompile per length.
    """
    return cfg.data.source == "synthetic" and cfg.data.synthetic_lengths == "full"
