"""`preview=true`: what a launch would do, printed without starting anything.

Resolved hyperparameters, world size, global batch, steps, tokens per step, a per-GPU memory
estimate, a time estimate (FLOPs and the rates measured on GPUs: launcher/speed.py), and the command
for every node. The arithmetic lives in small pure functions so it can
be checked against hand-computed cases.

Memory model (bytes per GPU), for a LoRA run where only the adapters train:
  weights      base params x dtype bytes; nf4: 4-bit linear weights (+ absmax per 64-block, 8-bit
               with double quant) and the rest in the compute dtype; ZeRO-3 shards them over the world;
               FSDP2 too, plus what it holds gathered: the root group (embeddings, head, norms) from
               forward to backward, the shard group computing (distributed.layers_per_group decoder layers)
               and a layer more per group prefetched (one; distributed.prefetch=N: N), as measured; with
               distributed.reshard_after_forward=false every layer stays gathered from forward to backward,
               with distributed.keep_gathered=N the last N groups (auto: decided by the GPU's spare memory after
               the first step, not in the estimate; the preview says how much it may add)
  lora         adapter params x 4 (PEFT keeps adapters in fp32), + 4 per param of gradients; FSDP2
               shards both
  optimizer    AdamW: 8 per adapter param (+4 fp32 master under DeepSpeed); ZeRO and FSDP2 shard it;
               offload (zero3_offload, fsdp2_offload) moves the sharded part to CPU memory
  activations  the decoder layers' (lora_launch.run.activations, which the trainer's grad_ckpt budgets read too):
               per token and layer, what backward keeps: each norm's input and output (4h), q (h), k and v
               (2 kv, the key/value width under grouped-query attention), the attention output (h), and the
               MLP's gate, up and activated gate (3i), in the activation dtype (attention with a fused
               kernel, no seq^2 term); a compiled decoder layer (train.compile=layers, the GPU default) keeps
               3h + 2kv + 3i, its norms recomputed in backward; a checkpointed layer (train.grad_ckpt: the
               first N) only its input (h), plus one layer recomputed where that is more than the kept layers
  logits       vocab x 10 bytes per token (bf16 logits, fp32 loss, grad), for the whole micro-batch or, with
               train.chunked_loss, one chunk of its tokens
tests/unit/test_preview.py holds the estimate within 10% of peaks measured on a GPU, for a 7B and a 70B shape
in bf16 and nf4, with and without grad ckpt; the measurements, dated, are in bench/README.md ("The preview's
memory estimate").
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from lora_launch.conf.compose import plain
from lora_launch.conf.dtypes import FLOATS
from lora_launch.conf.grad_ckpt import GradCkpt
from lora_launch.conf.grad_ckpt import read as read_grad_ckpt
from lora_launch.conf.schema import ALL_LINEAR, chunked_loss, lora_targets
from lora_launch.launcher.speed import (
    SPREAD,
    TimeEstimate,
    duration,
    estimate,
    flops_per_token,
    scientific,
    this_host_gpu,
)
from lora_launch.launcher.topology import Topology
from lora_launch.run.activations import LayerActivations, auto_budget, dequantised_bytes, logits_bytes
from lora_launch.run.activations import layer_activations as layer_activations_of
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for
from lora_launch.strategies.fsdp2 import gathered_bytes

GIB = 2**30
DTYPE_BYTES = {name: dtype.bytes for name, dtype in FLOATS.items()}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need from the architecture."""

    total_params: int
    quantisable_params: int  # linear weights inside the decoder layers (what nf4 packs)
    lora_params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_hidden: int = 0  # width of k and v (heads_kv x head_dim); 0: hidden (no grouped-query attention)


# ---- the model's shape ---------------------------------------------------------------------------


def model_config(cfg: DictConfig):
    """The model's transformers config, read without downloading anything (random_init: from model.arch)."""
    from transformers import AutoConfig

    if cfg.model.random_init:
        return AutoConfig.for_model(**plain(cfg.model.arch))
    # no download in a preview: a local directory or what the hub cache already holds
    return AutoConfig.from_pretrained(
        cfg.model.path, revision=cfg.model.revision, local_files_only=True, trust_remote_code=False
    )


def _targets(name: str, target_modules: str | list[str]) -> bool:
    if target_modules == ALL_LINEAR:  # every linear layer but the output head (the caller's filter)
        return True
    return any(name == t or name.endswith("." + t) for t in target_modules)


def model_shape(config, target_modules: str | list[str], r: int) -> ModelShape:
    """Exact parameter counts of `config`'s causal LM, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    quantisable = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "lm_head":
            quantisable += module.weight.numel()
            if _targets(name, target_modules):
                lora += r * (module.in_features + module.out_features)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = head_dim * (getattr(text, "num_key_value_heads", None) or heads)
    return ModelShape(
        total, quantisable, lora, text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size, kv
    )


# ---- data ---------------------------------------------------------------------------------------


def train_samples_estimate(cfg: DictConfig) -> int | None:
    """Training records of a local jsonl after the validation split (before any filtering); None if unknown."""
    path = Path(cfg.data.path) if cfg.data.path else None
    if cfg.data.source not in ("demo", "local") or path is None or path.suffix != ".jsonl" or not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        n = sum(1 for line in f if line.strip())
    if cfg.data.max_samples > 0:
        n = min(n, cfg.data.max_samples)
    return n - int(round(n * cfg.data.val_split))


# ---- memory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    weights: float
    lora: float
    optimizer: float
    activations: float  # the decoder layers', as train.grad_ckpt sets them
    logits: float  # what the loss keeps (one chunk's with train.chunked_loss)
    activations_ckpt: float  # the decoder layers' with every one checkpointed
    activations_full: float  # and with none
    checkpointed: int | None  # decoder layers checkpointed; None: grad_ckpt=auto, decided on the GPU at the start
    layers: int

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.optimizer + self.activations + self.logits


def weight_bytes(shape: ModelShape, quant: str, dtype_bytes: int, compute_bytes: int, double_quant: bool) -> float:
    """Bytes of the frozen base weights on one device before any sharding."""
    if quant != "nf4":
        return shape.total_params * dtype_bytes
    # 4 bits per weight; absmax per 64-weight block: fp32, or 8-bit plus an fp32 per 256 blocks
    absmax = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64
    rest = shape.total_params - shape.quantisable_params
    return shape.quantisable_params * (0.5 + absmax) + rest * compute_bytes


def layer_activations(
    shape: ModelShape, tokens: int, act_bytes: int, compiled: bool = False, dequantised: float = 0.0
) -> LayerActivations:
    """The decoder layers' activation terms for a micro-batch of `tokens` (lora_launch.run.activations)."""
    return layer_activations_of(
        shape.layers, shape.hidden, shape.kv_hidden, shape.intermediate, tokens, act_bytes, compiled, dequantised
    )


def activation_bytes(
    shape: ModelShape, tokens: int, act_bytes: int, grad_ckpt: bool | int, compiled: bool = False, chunked=False
) -> float:
    """Activations kept for backward over one micro-batch of `tokens` tokens with `grad_ckpt` decoder layers
    checkpointed (true: all), plus the logits (one chunk's when `chunked`). A compiled decoder layer
    (train.compile=layers) keeps three hidden-size tensors where eager keeps six: the compiler recomputes the
    norms' elementwise work in backward rather than storing its inputs and outputs."""
    n = shape.layers if grad_ckpt is True else int(grad_ckpt)
    decoder = layer_activations(shape, tokens, act_bytes, compiled).total(n)
    return decoder + logits_bytes(tokens, shape.hidden, shape.vocab, chunked)


def fsdp2_gathered_bytes(
    shape: ModelShape,
    quant: str,
    dtype_bytes: int,
    compute_bytes: int,
    double_quant: bool,
    per_group="auto",
    prefetch: int | None = None,
    kept: int = 0,
) -> float:
    """Base weights FSDP2 holds whole on a device at its peak (strategies/fsdp2.py's gathered_bytes)."""
    whole = weight_bytes(shape, quant, dtype_bytes, compute_bytes, double_quant)
    per_layer = _layer_bytes(shape, quant, dtype_bytes, compute_bytes, double_quant)
    return gathered_bytes(whole, per_layer, shape.layers, per_group, prefetch, kept)


def _layer_bytes(shape: ModelShape, quant: str, dtype_bytes: int, compute_bytes: int, double_quant: bool) -> float:
    """One decoder layer's linear weights as stored (nf4: packed, with their absmax)."""
    whole = weight_bytes(shape, quant, dtype_bytes, compute_bytes, double_quant)
    rest_bytes = compute_bytes if quant == "nf4" else dtype_bytes
    return (whole - (shape.total_params - shape.quantisable_params) * rest_bytes) / shape.layers


def gpu_memory_here() -> float | None:
    """Bytes free on this host's first GPU (what a run's `grad_ckpt=auto` would start from), None without one."""
    import torch

    return float(torch.cuda.mem_get_info(0)[0]) if torch.cuda.is_available() else None


def checkpointed_layers(
    setting: GradCkpt, acts: LayerActivations, on_gpu: bool, reachable: float | None, held: float, logits: float
) -> int | None:
    """How many decoder layers `setting` (train.grad_ckpt, read) checkpoints, as the trainer decides it
    (lora_launch.train.activations); None for `auto` on a GPU whose memory is unknown here."""
    n = setting.checkpointed(acts.layers)
    if n is not None:
        return n
    if setting.kind == "memory":
        return acts.checkpointed_within(setting.budget)
    if not on_gpu:
        return 0  # auto on CPU: none
    if reachable is None:
        return None
    return acts.checkpointed_within(auto_budget(reachable, held, logits))


def memory_estimate(cfg: DictConfig, shape: ModelShape, plan: RunPlan, reachable: float | None = None) -> Memory:
    """Per-device memory in bytes for this config under `plan` (its world size and weight dtype); `reachable`:
    the GPU memory a run may use, for grad_ckpt=auto (None: unknown here, the estimate then counts none
    checkpointed, the most auto may keep)."""
    dtype_bytes = DTYPE_BYTES[plan.model_dtype]
    compute_bytes = DTYPE_BYTES[cfg.quant.compute_dtype]
    quant, double_quant = cfg.quant.mode, cfg.quant.double_quant
    weights = weight_bytes(shape, quant, dtype_bytes, compute_bytes, double_quant)

    def gathered(per_group, prefetch, kept) -> float:
        return fsdp2_gathered_bytes(shape, quant, dtype_bytes, compute_bytes, double_quant, per_group, prefetch, kept)

    held = strategy_for(cfg).memory(cfg, plan, weights, shape.lora_params, gathered)
    act_bytes = compute_bytes if cfg.quant.mode == "nf4" else dtype_bytes
    tokens = cfg.train.micro_batch_size * cfg.train.seq_len
    dequantised = dequantised_bytes(cfg, plan, shape.quantisable_params // max(shape.layers, 1))
    acts = layer_activations(shape, tokens, act_bytes, plan.compile == "layers", dequantised)
    logits = logits_bytes(tokens, shape.hidden, shape.vocab, chunked_loss(cfg))
    held_bytes = held.weights + held.lora + held.optimizer
    n = checkpointed_layers(read_grad_ckpt(cfg.train.grad_ckpt), acts, plan.on_gpu, reachable, held_bytes, logits)
    return Memory(
        held.weights,
        held.lora,
        held.optimizer,
        acts.total(0 if n is None else n),
        logits,
        acts.total(shape.layers),
        acts.total(0),
        n,
        shape.layers,
    )


# ---- time ------------------------------------------------------------------------------------------


def matmul_params(shape: ModelShape) -> int:
    """Weights every token multiplies with: the decoder's linears and the output head (hidden x vocab)."""
    return shape.quantisable_params + shape.hidden * shape.vocab


def recomputed_share(mem: Memory) -> float:
    """The share of the decoder layers that recompute their activations (auto undecided: none)."""
    return (mem.checkpointed or 0) / max(mem.layers, 1)


def step_estimate(
    cfg: DictConfig, plan: RunPlan, shape: ModelShape, device_name: str | None, recomputed: float | None = None
) -> TimeEstimate:
    """One optimizer step of full seq_len samples: its FLOPs, and its time on the plan's GPUs named
    `device_name` (None: no GPU here). `recomputed`: the share of the decoder layers checkpointed (None: as
    memory_estimate decides it)."""
    t = cfg.train
    if recomputed is None:
        recomputed = recomputed_share(memory_estimate(cfg, shape, plan, gpu_memory_here() if plan.on_gpu else None))
    per_token = flops_per_token(
        matmul_params(shape), shape.lora_params, shape.layers, shape.hidden, t.seq_len, recomputed
    )
    return estimate(
        plan.global_batch * t.seq_len * per_token,
        device_name,
        plan.world_size,
        plan.on_gpu,
        plan.precision,
        cfg.quant.mode,
        recomputed,
        strategy_for(cfg).scaling(cfg, plan),
    )


def time_lines(
    cfg: DictConfig,
    plan: RunPlan,
    shape: ModelShape,
    steps: int | None,
    device_name: str | None,
    recomputed: float | None = None,
) -> list[str]:
    """The preview's time estimate: the run's tokens and FLOPs, and its time on `device_name` GPUs (or why not)."""
    t, gbs = cfg.train, plan.global_batch
    if recomputed is None:
        recomputed = recomputed_share(memory_estimate(cfg, shape, plan, gpu_memory_here() if plan.on_gpu else None))
    est = step_estimate(cfg, plan, shape, device_name, recomputed)
    per_step, per_token = est.flops_per_step, est.flops_per_step / (gbs * t.seq_len)
    if recomputed >= 1:
        counted = "6N: frozen base and grad ckpt's recompute"
    elif recomputed > 0:
        counted = f"{4 + 2 * recomputed:.3g}N: frozen base and the recompute of {recomputed:.0%} of the layers"
    else:
        counted = "4N: frozen base"
    tokens = f"{steps} steps x " if steps is not None else "a step: "
    tokens += f"{gbs} samples x <= {t.seq_len} (seq_len: an upper bound on each sample's tokens)"
    flops = f"{scientific(per_token)} a token ({counted}, N {scientific(matmul_params(shape))}; + attention + adapters)"
    if steps is not None:
        tokens += f" = {steps * gbs * t.seq_len:,}"
        flops += f" = {scientific(steps * per_step)}"
    out = ["", "# time (estimate)", f"tokens       {tokens}", f"FLOPs        {flops}"]
    if est.step_seconds is None:
        return [*out, f"time         {est.basis[0]}"]
    if steps is None:
        when = f"≈ {est.step_seconds:.2g} s a step on {est.where} (the steps are unknown until the data is read)"
    else:
        total = steps * est.step_seconds
        when = (
            f"≈ {duration(total)} ({duration(total * (1 - SPREAD))} to {duration(total * (1 + SPREAD))}) on {est.where}"
        )
    return [
        *out,
        f"time         {when}",
        *[f"{'basis' if i == 0 else '':13}{line}" for i, line in enumerate(est.basis)],
    ]


# ---- commands --------------------------------------------------------------------------------------


def node_commands(cfg: DictConfig, topo: Topology, overrides: list[str]) -> list[str]:
    """For each node: the lora-launch command to run there, and the accelerate launch it starts."""
    from lora_launch.launcher.launch import launch_command, printable

    run_dir = Path(cfg.run.dir)
    files = {"accelerate": run_dir / "accelerate.yaml", "config": run_dir / "config.yaml"}
    # quoted as a shell reads them: a user pastes these lines
    user = shlex.join(o for o in overrides if not o.startswith(("preview=", "launcher.node_rank=")))
    if cfg.launcher.name == "slurm":
        return [
            f"submit: lora-launch {user}  (writes {run_dir}/slurm.sbatch, runs sbatch on it)",
            f"each of the {topo.num_machines} nodes then runs: python -m lora_launch.launcher.node --run-dir "
            f"{shlex.quote(str(run_dir))}",
        ]
    lines = []
    for rank in range(topo.num_machines):
        host = topo.hosts[rank] if topo.hosts else "this host"
        multi = topo.num_machines > 1
        cmd = launch_command(files, node_rank=rank if multi else None)
        extra = f" launcher.node_rank={rank}" if multi else ""
        lines.append(f"node {rank} ({host}): lora-launch {user}{extra}")
        note = "  (GLOO/NCCL_SOCKET_IFNAME: the interface routing to the first host)" if multi else ""
        lines.append(f"    runs: {printable(cmd)}{note}")
    return lines


# ---- the report ----------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _activations_line(mem: Memory, setting) -> str:
    """The decoder layers' activations as configured, and at both ends (every layer checkpointed, none)."""
    ends = f"every one checkpointed {_gib(mem.activations_ckpt)}, none {_gib(mem.activations_full)}"
    if mem.checkpointed is None:
        return (
            f"at most {_gib(mem.activations_full)} (train.grad_ckpt=auto: as many layers keep theirs as the GPU's "
            f"free memory holds, decided at the start; {ends})"
        )
    return (
        f"{_gib(mem.activations)} ({mem.checkpointed} of {mem.layers} decoder layers checkpointed: "
        f"train.grad_ckpt={str(setting).lower() if isinstance(setting, bool) else setting}; {ends})"
    )


def _shape_or_none(cfg: DictConfig) -> tuple[ModelShape | None, str]:
    try:
        return model_shape(model_config(cfg), lora_targets(cfg), cfg.lora.r), ""
    except (OSError, ValueError) as e:
        return None, f"model shape unknown ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def _target_names(cfg: DictConfig) -> str:
    targets = lora_targets(cfg)
    return targets if targets == ALL_LINEAR else ", ".join(targets)


def preview(cfg: DictConfig, topo: Topology, plan: RunPlan, overrides: list[str]) -> str:
    """The preview text."""
    t, strategy = cfg.train, strategy_for(cfg)
    gbs = plan.global_batch
    out = [
        "# resolved config",
        yaml.safe_dump(plain(cfg), sort_keys=False).rstrip(),
        "",
        "# launch",
        f"nodes {topo.num_machines} x {topo.procs_per_node} processes = world size {topo.world_size}",
        f"global batch = micro {t.micro_batch_size} x accum {t.grad_accum} x world {topo.world_size} = {gbs}",
        f"tokens per step <= {gbs} x seq_len {t.seq_len} = {gbs * t.seq_len}",
        f"precision {plan.precision} (base weights {plan.model_dtype}), compile {plan.compile}, "
        f"{strategy.describe(cfg, plan)}{' with CPU offload' if cfg.distributed.offload_params else ''}"
        f"{'' if plan.on_gpu else ' on CPU (gloo)'}",
    ]
    n = train_samples_estimate(cfg)
    if n is not None:
        per_epoch, total = plan.steps_per_epoch(n), plan.total_steps(n)
        out.append(
            f"train samples ~{n} (records after the validation split, before filtering); "
            f"steps per epoch {per_epoch}, total steps {total}"
        )
    else:
        out.append(f"steps: {t.max_steps} total" if t.max_steps > 0 else "steps: unknown until the data is read")
    shape, why = _shape_or_none(cfg)
    if shape is None:
        out.append(why)
    else:
        mem = memory_estimate(cfg, shape, plan, gpu_memory_here() if plan.on_gpu else None)
        out += [
            "",
            "# model",
            f"parameters {shape.total_params:,} ({shape.quantisable_params:,} in decoder linears)",
            f"LoRA parameters {shape.lora_params:,} (r={cfg.lora.r} on {_target_names(cfg)})",
            "",
            "# memory per GPU (estimate, excludes CUDA context)",
            f"weights      {_gib(mem.weights)} ({cfg.quant.mode if cfg.quant.mode == 'nf4' else plan.model_dtype})",
            f"lora+grads   {_gib(mem.lora)}",
            f"optimizer    {_gib(mem.optimizer)}",
            f"activations  {_activations_line(mem, t.grad_ckpt)}",
            f"logits       {_gib(mem.logits)} ("
            + ("one chunk of tokens: train.chunked_loss" if chunked_loss(cfg) else "the whole micro-batch's")
            + ")",
            f"total        {_gib(mem.total)} (as configured)",
        ]
        out += strategy.preview_lines(
            cfg,
            plan,
            shape.layers,
            _layer_bytes(
                shape,
                cfg.quant.mode,
                DTYPE_BYTES[plan.model_dtype],
                DTYPE_BYTES[cfg.quant.compute_dtype],
                cfg.quant.double_quant,
            ),
            _gib,
        )
        if strategy.loads_from_rank0(cfg, plan):
            whole = weight_bytes(shape, "none", DTYPE_BYTES[plan.model_dtype], 0, False)
            out.append(
                f"host memory  rank 0 reads the whole base into CPU memory ({_gib(whole)}) and sends every "
                "rank its shards; the other ranks hold none of it"
            )
        steps = total if n is not None else (t.max_steps if t.max_steps > 0 else None)
        out += time_lines(cfg, plan, shape, steps, this_host_gpu() if plan.on_gpu else None, recomputed_share(mem))
    out += ["", "# commands (nothing was started)", *node_commands(cfg, topo, overrides)]
    return "\n".join(out)
