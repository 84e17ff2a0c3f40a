"""Typed schema of the whole config tree and every default, registered with Hydra's ConfigStore (conf/compose.py).

OmegaConf checks types, choices (Enum fields) and unknown keys when the config is composed;
the value ranges (``lora.r >= 1``, ``optim.lr > 0``, ...) live next to each field as metadata
and are checked by :func:`validate`, so a bad value fails with its key's name before any
process starts. Keys that may change when a run resumes are marked on the fields too
(:func:`resume_free_keys`), and so are the keys that name files, directories or URIs (:func:`path_keys`).
Every string value must be one line of printable text (:func:`check_text`): values reach scripts,
command lines and generated files, and never become code there.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import unicodedata
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf

from lora_launch import strategies
from lora_launch.conf import grad_ckpt
from lora_launch.conf.dtypes import FLOATS, PACKED
from lora_launch.conf.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that composes but cannot be used; the message names the key."""


# field metadata: the key may differ between a checkpoint and its resume without asking
RESUME_FREE = {"resume": "free"}


def ranged(default, lo=None, hi=None, *, lo_open=False, resume: str | None = None):
    """A numeric field with its allowed range, checked by `validate`."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open}
    if resume:
        meta["resume"] = resume
    return field(default=default, metadata=meta)


def free(default=NO_DEFAULT, *, default_factory=NO_DEFAULT):
    """A field (or a whole group) that may change when a run resumes."""
    return field(default=default, default_factory=default_factory, metadata=RESUME_FREE)


def pathlike(default=None, *, writes=False, uri=False, **meta):
    """A field that names a file or directory (a hub name or URI that may be one too): the studio keeps each
    inside its folders. `writes`: training writes there (read-only places such as bundled assets won't do);
    `uri`: a URI whose file:/sqlite: forms are local paths."""
    return field(default=default, metadata={**meta, "path": "writes" if writes else "reads", "uri": uri})


def prose(default=None):
    """A free-text field only the model reads (prompts): it may span lines; other control characters are refused."""
    return field(default=default, metadata={"prose": True})


class Choice(str, Enum):  # noqa: UP042 (StrEnum would change how OmegaConf and format() read members)
    """A choice field's words. OmegaConf reads a member by its name, so each name is its value; the
    members compare, hash, print and format as that plain string (`cfg.quant.mode == "nf4"`)."""

    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__


# torch's names for the floating dtypes (conf/dtypes.py); AutoDtype adds `auto`: chosen from the hardware
# (train.precision) or the precision (model.dtype)
Dtype = Choice("Dtype", [(name, name) for name in FLOATS])
AutoDtype = Choice("AutoDtype", [(name, name) for name in ("auto", *FLOATS)])


class QuantKernel(Choice):
    auto = "auto"
    bitsandbytes = "bitsandbytes"
    torch = "torch"


# the packed 4-bit weights: two to a byte, or a float (what ZeRO-3 and FSDP2 shard)
StorageDtype = Choice("StorageDtype", [(name, name) for name in (PACKED, *FLOATS)])


class DataSource(Choice):
    demo = "demo"
    hub = "hub"
    local = "local"
    synthetic = "synthetic"


class DataFormat(Choice):
    auto = "auto"
    text = "text"
    instruction = "instruction"
    messages = "messages"
    sharegpt = "sharegpt"
    prompt_completion = "prompt_completion"
    classification = "classification"
    summary = "summary"
    qa = "qa"


class Template(Choice):
    auto = "auto"
    llama2 = "llama2"
    alpaca = "alpaca"
    chatml = "chatml"
    tokenizer = "tokenizer"


class SyntheticLengths(Choice):
    full = "full"
    lognormal = "lognormal"


class PackingStrategy(Choice):
    bfd = "bfd"
    next_fit = "next_fit"


class LoraBias(Choice):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class QuantMode(Choice):
    none = "none"
    nf4 = "nf4"


class Optimizer(Choice):
    adamw_torch = "adamw_torch"
    adamw_torch_fused = "adamw_torch_fused"
    adamw_bnb_8bit = "adamw_bnb_8bit"
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"


# optim.name -> the bitsandbytes optimizer class it runs (the others are torch's AdamW)
BNB_OPTIMIZERS = {
    "adamw_bnb_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}


class Scheduler(Choice):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


# the strategies' own modules (lora_launch.strategies) are the choices
Strategy = Choice("Strategy", [(name, name) for name in strategies.names()])


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Compile(Choice):
    auto = "auto"
    layers = "layers"
    loss = "loss"
    none = "none"


SDPA_VARLEN = "sdpa_varlen"  # registered with transformers by lora_launch.train.attention


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory; null builds the model from `arch` with random weights.
    path: str | None = pathlike()
    tokenizer: str | None = pathlike()  # defaults to `path`
    revision: str | None = None
    random_init: bool = False
    # LlamaConfig fields for random_init models (e.g. the 7B shape for benchmarks).
    arch: dict = field(default_factory=dict)
    dtype: AutoDtype = AutoDtype.auto
    # this project's sdpa_varlen (sdpa, with packed rows through torch's variable-length flash kernel), or
    # any implementation transformers takes: sdpa, eager, flash_attention_2/3, flex_attention, a hub kernel
    # (kernels-community/...); checked before launch by building the model on the meta device
    attn_implementation: str = SDPA_VARLEN
    trust_remote_code: bool = False


@dataclass
class DataFields:
    """Dataset columns the structured formats read (`data.fields.output=response`, ...)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"  # optional per-record system prompt
    messages: str = "messages"
    conversations: str = "conversations"  # sharegpt: [{from: human|gpt|system, value}]
    prompt: str = "prompt"  # prompt_completion
    completion: str = "completion"
    label: str = "label"
    document: str = "document"
    summary: str = "summary"
    context: str = "context"
    question: str = "question"
    answer: str = "answer"


@dataclass
class DataConfig:
    name: str = pathlike(MISSING)  # data=hub with data.path null: the hub dataset's name
    # `demo` (bundled), `hub` (datasets.load_dataset(path)), `local` (a json/jsonl/csv/parquet
    # file or a directory of them), `synthetic` (random tokens for benchmarks: no file, no
    # tokenizer work).
    source: DataSource = DataSource.demo
    # local file or directory, or the hub dataset's name (data=hub: null takes `name`)
    path: str | None = pathlike()
    revision: str | None = None  # hub datasets: branch, tag or commit
    split: str = "train"
    # `auto`: picked from the fields present (messages, conversations, instruction + output, prompt +
    # completion, text; said in one line); `text`: pre-formatted text in `text_field`; `instruction`
    # (alpaca instruction/input/output), `messages` (chat lists of {role, content}), `sharegpt`
    # (conversations of {from, value}), `prompt_completion` (prompt + completion, written as they are);
    # task types `classification` (text_field + label), `summary` (document + summary), `qa`
    format: DataFormat = DataFormat.auto
    text_field: str = "text"
    fields: DataFields = field(default_factory=DataFields)
    # how structured formats are written out: `auto` (the tokenizer's chat template when it has one that
    # masks cleanly, else chatml), `llama2` ([INST] … [/INST]), `alpaca`, `chatml`, `tokenizer`
    template: Template = Template.auto
    system_prompt: str | None = prose()
    task_instruction: str | None = prose()  # classification/summary/qa: replaces the default instruction
    label_names: list = field(default_factory=list)  # classification: names of integer labels, listed in the prompt
    val_split: float = ranged(0.05, lo=0.0, hi=0.9)  # share of records held out, drawn by `seed`
    val_split_name: str | None = None  # the dataset's own validation split instead (e.g. validation)
    train_on_prompt: bool = False  # structured formats: false masks prompt tokens out of the loss
    truncation: bool = True  # false drops samples longer than train.seq_len instead of cutting them
    packing: bool = False  # pack samples into train.seq_len rows (no attention across samples)
    # how: `bfd` (best-fit decreasing, rows ~99% full) or `next_fit` (in order, ~80%; packing before bfd)
    packing_strategy: PackingStrategy = PackingStrategy.bfd
    group_by_length: bool = False  # batches of similar length (not with packing)
    max_samples: int = ranged(-1, lo=-1)
    # tokenised datasets; null: $LORA_LAUNCH_CACHE or ~/.cache/lora-launch
    cache_dir: str | None = pathlike(writes=True)
    # several datasets mixed by weight: [{path: a.jsonl, weight: 2}, {source: hub, path: OWNER/NAME, weight: 1}];
    # each entry's keys (any data.* key but these two) override the settings above for that source
    sources: list = field(default_factory=list)
    # synthetic sample lengths: `full` (train.seq_len each) or `lognormal` (instruction-data-like)
    synthetic_lengths: SyntheticLengths = SyntheticLengths.full


@dataclass
class LoraConfig:
    r: int = ranged(8, lo=1)
    alpha: float = ranged(16.0, lo=0.0, lo_open=True)
    dropout: float = ranged(0.05, lo=0.0, hi=0.99)
    # module names (PEFT matches a name's last parts), or `all-linear`: every linear layer but the output head
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: LoraBias = LoraBias.none


@dataclass
class QuantConfig:
    mode: QuantMode = QuantMode.none
    compute_dtype: Dtype = Dtype.bfloat16
    double_quant: bool = True
    # storage dtype of the packed 4-bit weights; must match the compute dtype for ZeRO-3
    storage_dtype: StorageDtype = StorageDtype.uint8
    # PEFT's prepare_model_for_kbit_training casts every non-4-bit weight (norms, embeddings,
    # lm_head) to float32; false keeps them in the compute dtype: less memory, faster steps
    upcast_frozen: bool = False
    # training's 4-bit matmul: bitsandbytes' matmul_4bit, or `torch`: the same dequantisation written in torch
    # operations (bit-identical weights), which torch.compile fuses into each compiled decoder layer; the
    # packed weight alone is kept for backward. `torch` needs whole weights on every process (ddp, zero2);
    # auto: torch there, bitsandbytes under fsdp2 and zero3. `generate` and `serve` keep bitsandbytes'
    kernel: QuantKernel = QuantKernel.auto


@dataclass
class OptimConfig:
    # torch's AdamW (adamw_torch_fused: its fused kernel), or bitsandbytes' AdamW with 8-bit states
    # (adamw_bnb_8bit, paged_adamw_8bit) or paged 32-bit states (the QLoRA recipe); paging is GPU-only
    name: Optimizer = Optimizer.adamw_torch
    lr: float = ranged(2e-4, lo=0.0, lo_open=True)
    weight_decay: float = ranged(0.0, lo=0.0)
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = ranged(1e-8, lo=0.0, lo_open=True)
    scheduler: Scheduler = Scheduler.cosine  # constant | cosine | linear
    warmup_steps: int = ranged(0, lo=0)
    warmup_ratio: float = ranged(0.0, lo=0.0, hi=1.0)
    max_grad_norm: float = ranged(1.0, lo=0.0)  # 0 disables clipping


@dataclass
class DistributedConfig:
    name: str = MISSING
    strategy: Strategy = Strategy["ddp"]
    zero_stage: int = ranged(0, lo=0, hi=3)
    # to CPU memory; fsdp2 offloads both together (its optimizer step runs where the sharded parameters are)
    offload_optimizer: bool = False
    offload_params: bool = False
    # your own DeepSpeed JSON, merged under what the run sets (batch sizes, precision, stage: absent, equal or
    # "auto"); the rest of it (bucket sizes, offload details, ...) is kept
    deepspeed_config: str | None = pathlike()
    # fsdp2: copies of the model, each sharded over world / replicate ranks, gradients averaged between the
    # copies (hybrid sharding: gathers stay inside a copy). "auto": one copy per node when several nodes of
    # several processes each run
    replicate: Any = field(default="auto", metadata={"type": "int|auto"})
    # fsdp2: free each decoder layer's gathered weights after its forward (gather again for backward); false
    # keeps them from forward to backward: one gather a step instead of two, at the memory of the whole base
    reshard_after_forward: bool = True
    # fsdp2: the last N shard groups (they run last in forward, first in backward) stay gathered from forward to
    # backward: no second gather for them, at their whole weights in memory. "auto": as many as the GPU's spare
    # memory holds after the first step (never above 90% of what this process can reach; none on CPU), the
    # same on every rank; the log says how many. 0: every group gathered twice a step, the least memory
    keep_gathered: Any = field(default="auto", metadata={"type": "int|auto"})
    # fsdp2: consecutive decoder layers in each shard group: one gather, and one set of hooks, for all of them.
    # "auto": up to 4 layers, as many as hold at most 2 GiB of weights (7B in bf16: 4; 70B in bf16: 1)
    layers_per_group: Any = field(default="auto", metadata={"type": "int|auto"})
    # fsdp2: shard groups whose gathers each group issues ahead of its own compute, in forward and backward;
    # null: FSDP2's own prefetch (one group ahead, issued when the CPU reaches it)
    prefetch: int | None = ranged(None, lo=1)


@dataclass
class SlurmConfig:
    nodes: int = ranged(1, lo=1)
    gpus_per_node: int = ranged(0, lo=0)  # 0: request no GPUs (CPU jobs)
    cpus_per_task: int = ranged(0, lo=0)  # 0: leave it to the cluster's default
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # sbatch --time, e.g. "04:00:00"
    # SIGTERM this many seconds before the time limit: the run checkpoints and is requeued
    signal_before_s: int = ranged(120, lo=0)
    extra: list = field(default_factory=list)  # more `#SBATCH` lines, e.g. ["--exclusive"]
    submit: bool = True  # false: only write RUN/slurm.sbatch


@dataclass
class LauncherConfig:
    name: str = MISSING
    # int, or "auto": every visible GPU (1 process on CPU); per node
    num_processes: Any = field(default="auto", metadata={"type": "int|auto"})
    num_machines: int = ranged(1, lo=1)
    machine_rank: int = ranged(0, lo=0)
    main_process_ip: str = "127.0.0.1"
    # the first host's rendezvous port across nodes (a restart k takes port + k); one node takes a free port
    main_process_port: int = ranged(29500, lo=1, hi=65535)
    # launcher=hostfile: DeepSpeed-style hostfile; the first host is the rendezvous
    hostfile: str | None = pathlike()
    # this node's line in the hostfile (0-based); null: found from the host's names and addresses
    node_rank: int | None = ranged(None, lo=0)
    # interface for GLOO/NCCL_SOCKET_IFNAME; null: the one that routes to the rendezvous address
    network_interface: str | None = None
    # your own accelerate config file, merged under what the run sets (process counts, distributed type,
    # precision, port: absent or equal); its other settings are kept
    accelerate_config: str | None = pathlike()
    # after a rank dies (a crash, an OOM kill, a lost host), stop every rank and relaunch from the last
    # checkpoint up to this many times; a failure that repeats after the same step stops at once; 0: never
    max_restarts: int = ranged(3, lo=0)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled  # offline | online | disabled
    project: str = "lora-launch"
    entity: str | None = None


@dataclass
class MlflowConfig:
    enabled: bool = False  # true needs `pip install mlflow` (or mlflow-skinny)
    experiment: str = "lora-launch"
    # null: $MLFLOW_TRACKING_URI, else a file store in RUN/mlruns
    tracking_uri: str | None = pathlike(writes=True, uri=True)


@dataclass
class LoggingConfig:
    every_steps: int = ranged(1, lo=1)
    progress_bar: bool = True
    tensorboard: bool = True
    # per-rank record of samples and weight digests (ranks/rank*.jsonl), for auditing sync
    rank_audit: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class TrainConfig:
    max_steps: int = ranged(-1, lo=-1)  # -1: run `epochs` epochs
    epochs: float = ranged(1.0, lo=0.0, lo_open=True)
    micro_batch_size: int = ranged(4, lo=1)
    grad_accum: int = ranged(1, lo=1)
    seq_len: int = ranged(512, lo=8)
    # activation (gradient) checkpointing: false, true (every decoder layer), N (the first N decoder layers), a
    # budget such as 20GiB (what the decoder layers' activations of a micro-batch may use: as many layers keep
    # theirs as it holds, from the preview's memory model), or auto (as many as the GPU's free memory at the start
    # holds; none on CPU). The rest recompute theirs in backward; the log says how many
    grad_ckpt: Any = field(default=False, metadata={"type": grad_ckpt.TYPE})
    # the loss in chunks of tokens, never the whole micro-batch's logits at once (each chunk's recomputed in
    # backward): true, false, or auto: on with grad ckpt (where memory is short and the logits are a large share of
    # the activations), off without (the one compiled loss is faster). Off where the model's output head is not a
    # plain linear layer (a LoRA target, logit soft-capping)
    chunked_loss: Any = field(default="auto", metadata={"type": "bool|auto"})
    # compute precision: `auto` is bfloat16 on GPUs that have it, float32 otherwise
    precision: AutoDtype = AutoDtype.auto
    num_workers: int = ranged(0, lo=0, resume="free")
    threads: int = ranged(0, lo=0, resume="free")  # torch intra-op threads per process; 0 leaves torch's choice
    # torch.compile: `layers` (decoder layers and loss), `loss` (loss only), `none`; `auto` is
    # `layers` on GPUs (`loss` under ZeRO-3, whose sharded weights dynamo cannot trace) and `none` on CPU
    compile: Compile = free(Compile.auto)
    # optional: micro_batch_size x grad_accum x world size must equal it (checked before launch)
    global_batch_size: int | None = ranged(None, lo=1)
    # kernels that give the same bits on every run (torch's deterministic algorithms: an op that has none fails
    # naming itself), so that on GPUs two runs of one config, and a resumed run and an uninterrupted one, log
    # equal losses; slower (bench/README.md). Without it GPU kernels that add with atomics (the attention's
    # backward, some compiled ones) leave the last bits free; CPU runs repeat either way
    deterministic: bool = free(False)
    # each decoder layer's q/k/v projections as one matmul over their frozen weights laid end to end, and gate/up as
    # another (forward, and the input gradient in backward), every targeted projection's adapter added to its slice:
    # fewer, larger kernels. The adapters, their names, the optimizer state and checkpoints are the separate
    # projections' (free to change on resume; losses equal to rounding). Llama-style layers (q_proj/k_proj/v_proj,
    # gate_proj/up_proj); not with quant=nf4, nor where the strategy shards the weights (zero3, fsdp2). Speed in
    # bench/README.md
    fused_projections: bool = free(False)


@dataclass
class EvalConfig:
    every_steps: int = ranged(0, lo=0)  # 0: only at the start and the end
    at_start: bool = True
    max_batches: int = ranged(-1, lo=-1)


@dataclass
class CheckpointConfig:
    every_steps: int = ranged(500, lo=0)  # and the last step; 0: no periodic checkpoints
    keep_last: int = ranged(2, lo=1)  # newest complete checkpoints kept
    # periodic saves: copy the states, write the files in a thread while training goes on (false: wait)
    background: bool = True
    background_min_mib: int = ranged(64, lo=0)  # smaller saves are written at once (they take milliseconds)


@dataclass
class ResumeConfig:
    # auto: continue from the newest complete checkpoint in run.dir; never: start over
    # (earlier checkpoints and metrics are moved aside); or the path of one checkpoint directory
    mode: str = pathlike("auto", type="auto|never|CHECKPOINT_DIR")
    # config keys that may differ from the checkpoint's (e.g. [optim.lr, train.max_steps]);
    # `data` and `tokenizer` also accept a changed tokenised dataset or tokenizer
    allow_changes: list = field(default_factory=list)


@dataclass
class RunConfig:
    # where the run's config, checkpoints, metrics and adapter go; the default is a new folder per launch
    dir: str = pathlike("runs/${now:%Y-%m-%d_%H-%M-%S}", writes=True)


class SweepSearch(Choice):
    grid = "grid"
    tpe = "tpe"
    random = "random"


class Pruner(Choice):
    none = "none"
    median = "median"
    hyperband = "hyperband"


@dataclass
class SweepConfig:
    continue_on_failure: bool = True  # a failed trial is recorded and the sweep goes on
    # concurrent trials, each on its own devices: "auto" is the visible GPUs / launcher.num_processes
    # (1 on CPU); a number N runs N at once (on CPU each gets cores / N threads per process)
    parallel: Any = field(default="auto", metadata={"type": "int|auto"})
    # grid: every combination; tpe | random: an Optuna study over interval()/choice()/lists, kept in the sweep dir
    search: SweepSearch = SweepSearch.grid
    trials: int = ranged(20, lo=1)  # a search's trials in all; a re-run with more continues the study
    prune: Pruner = Pruner.none  # stop trials whose eval loss falls behind (judged at each eval.every_steps)
    prune_startup_trials: int = ranged(3, lo=0)  # median: trials that finish before any is pruned
    prune_warmup_steps: int = ranged(0, lo=0)  # no trial is pruned before this optimizer step
    resume_pruned: bool = False  # true: pruned trials continue from their checkpoints to the end


@dataclass
class SampleConfig:
    # a user message, written out with the run's template (raw for data.format=text)
    prompt: str = prose("Where is Italy?")
    max_new_tokens: int = ranged(48, lo=0)


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = free(MISSING)
    launcher: LauncherConfig = free(MISSING)
    logging: LoggingConfig = free(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = free(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = free(default_factory=CheckpointConfig)
    resume: ResumeConfig = free(default_factory=ResumeConfig)
    run: RunConfig = free(default_factory=RunConfig)
    sample: SampleConfig = free(default_factory=SampleConfig)
    sweep: SweepConfig = free(default_factory=SweepConfig)
    seed: int = ranged(0, lo=0)
    preview: bool = free(False)


def asset_path(name: str) -> str:
    """Absolute path of a file or directory shipped in conf/assets (the `${asset:...}` resolver)."""
    return str(importlib.resources.files("lora_launch.conf").joinpath("assets", name))


def _check_field(key: str, value: Any, meta: dict) -> None:
    if value is None or not meta:
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ConfigError(f"{key}={value} must be {'>' if meta.get('lo_open') else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value} must be <= {hi}")


@functools.cache
def type_hints(schema: type) -> dict[str, Any]:
    """The field types of a schema dataclass, read once: `get_type_hints` evaluates every annotation's text again
    on each call, and composing, the help and the studio's form ask for them hundreds of times. Read-only."""
    return get_type_hints(schema)


def _walk(prefix: str, schema_cls: type, node: DictConfig) -> None:
    hints = type_hints(schema_cls)
    for f in fields(schema_cls):
        key, value = f"{prefix}{f.name}", node[f.name]
        if is_dataclass(hints[f.name]):
            _walk(key + ".", hints[f.name], value)
        else:
            _check_field(key, value, dict(f.metadata))


def unknown_key(key: str) -> str:
    """The message for a key the schema does not have, listing the keys its parent does have."""
    parent = key.rpartition(".")[0]
    root = OmegaConf.structured(Config)
    node = OmegaConf.select(root, parent) if parent else root
    known = ", ".join(str(k) for k in node.keys()) if isinstance(node, DictConfig) else ""
    return f"{key} is not a key of the config" + (f" ({parent or 'the top level'} has: {known})" if known else "")


def _only_known_keys(tree: Any, schema: type) -> bool:
    """Whether every key of `tree` is surely a field of `schema` (nested sections followed); False when in doubt."""
    if not isinstance(tree, dict):
        return False
    hints, names = type_hints(schema), {f.name for f in fields(schema)}
    for key, value in tree.items():
        if key not in names:
            return False
        if is_dataclass(hints[key]) and not _only_known_keys(value, hints[key]):
            return False
        if not is_dataclass(hints[key]) and any(is_dataclass(a) for a in get_args(hints[key])):
            return False  # a union or list of sections: the merge below reads it
    return True


def _check_keys(tree: dict) -> None:
    """Every key is one of the schema's: `+group.key=...` can append keys Hydra then lets through. A tree of the
    schema's keys only, the usual case, is passed without merging it into the schema (some 35 ms a check); the
    merge names the unknown key."""
    from omegaconf.errors import ConfigKeyError

    if _only_known_keys(tree, Config):
        return
    try:
        OmegaConf.merge(OmegaConf.structured(Config), tree)
    except ConfigKeyError as e:
        raise ConfigError(unknown_key(getattr(e, "full_key", None) or str(e).splitlines()[0])) from None


def _control(text: str, prose: bool = False) -> str | None:
    """The first control character or line/paragraph separator in `text` (prose may hold newlines and tabs)."""
    return next(
        (c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp") and not (prose and c in "\n\t")), None
    )


def check_text(key: str, value: Any, prose: bool = False) -> None:
    """ConfigError naming `key` when a string `value` holds a control character: it could end a line of a script
    or a file and start another (a newline in an #SBATCH line becomes a shell command)."""
    bad = _control(value, prose) if isinstance(value, str) else None
    if bad is not None:
        rule = (
            "this text may span lines but holds no other control characters"
            if prose
            else "a value must be one line without control characters (values reach command lines, scripts and "
            "generated files)"
        )
        raise ConfigError(f"{key}={value!r} holds the control character {bad!r}; {rule}")


def _prose_keys() -> set[str]:
    return {k for k, f in _leaf_fields(Config) if f.metadata.get("prose")}


def _check_texts(tree: Any, key: str = "", prose: frozenset = frozenset()) -> None:
    """check_text on every string of a plain config tree, mapping keys and list entries included."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_text(f"a key of {key or 'the config'}", k)
            _check_texts(v, f"{key}.{k}" if key else str(k), prose)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _check_texts(v, f"{key}[{i}]", prose)
    else:
        # a data.sources entry takes data.* keys: its prompts are prose as data's are
        check_text(key, tree, re.sub(r"^data\.sources\[\d+\]\.", "data.", key) in prose)


def quant_kernel(cfg: DictConfig) -> str:
    """The 4-bit matmul training uses (quant.kernel, `auto` resolved): `torch` or `bitsandbytes`."""
    kernel = str(cfg.quant.kernel)
    if kernel != "auto":
        return kernel
    return "bitsandbytes" if strategies.strategy_for(cfg).shards_weights(cfg) else "torch"


def chunked_loss(cfg: DictConfig) -> bool:
    """Whether the loss is asked for in chunks (train.chunked_loss, `auto` resolved: with grad ckpt); the model
    may still refuse it (lora_launch.train.chunked_loss)."""
    asked = cfg.train.chunked_loss
    return grad_ckpt.read(cfg.train.grad_ckpt).on if asked == "auto" else bool(asked)


def validate(cfg: DictConfig) -> None:
    """Check keys, text, value ranges and cross-field rules; raise ConfigError naming the key."""
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    _check_keys(tree)
    _check_texts(tree, prose=frozenset(_prose_keys()))
    _walk("", Config, cfg)
    for key, least in (
        ("launcher.num_processes", 1),
        ("distributed.replicate", 1),
        ("distributed.layers_per_group", 1),
        ("distributed.keep_gathered", 0),
        ("sweep.parallel", 1),
    ):  # the "int|auto" fields
        v = OmegaConf.select(cfg, key)
        if not (v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= least)):
            what = "a positive integer" if least == 1 else "a whole number (0 or more)"
            raise ConfigError(f"{key}={v!r} must be {what} or 'auto'")
    try:
        grad_ckpt.read(cfg.train.grad_ckpt)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    chunked = cfg.train.chunked_loss
    if not (isinstance(chunked, bool) or chunked == "auto"):
        raise ConfigError(f"train.chunked_loss={chunked!r} must be true, false or auto")
    if str(cfg.quant.kernel) == "torch" and strategies.strategy_for(cfg).shards_weights(cfg):
        raise ConfigError(
            f"quant.kernel=torch with distributed={cfg.distributed.name}: the 4-bit weights are sharded "
            "there; use quant.kernel=bitsandbytes, or distributed=ddp or zero2"
        )
    _validate_fused_projections(cfg)
    for problem in strategies.strategy_for(cfg).problems(cfg):
        raise ConfigError(problem)
    lora_targets(cfg)
    _check_data_sources(cfg)
    if cfg.model.path is None and not cfg.model.random_init:
        raise ConfigError("model.path is null: give a hub id or local directory, or set model.random_init=true")
    _validate_data(cfg.data)
    _validate_resume(cfg.resume)


def _validate_fused_projections(cfg: DictConfig) -> None:
    """train.fused_projections joins whole frozen linear weights: not 4-bit ones, nor shards of them."""
    if not cfg.train.fused_projections:
        return
    if cfg.quant.mode == "nf4":
        raise ConfigError(
            "train.fused_projections=true with quant=nf4: the 4-bit weights are packed one projection at a time; "
            "set train.fused_projections=false, or quant=none"
        )
    if strategies.strategy_for(cfg).shards_weights(cfg):
        raise ConfigError(
            f"train.fused_projections=true with distributed={cfg.distributed.name}: each process holds shards of "
            "the weights, not whole projections to join; set train.fused_projections=false, or use "
            "distributed=ddp or zero2"
        )


def _validate_resume(r: DictConfig) -> None:
    if r.mode not in ("auto", "never") and not (Path(r.mode) / "manifest.json").is_file():
        raise ConfigError(
            f"resume.mode={r.mode}: not auto, never or a checkpoint directory "
            "(run.dir/checkpoints/step-N, with its manifest.json)"
        )


def _validate_data(d: DictConfig) -> None:
    if d.packing and d.group_by_length:
        raise ConfigError(
            "data.packing and data.group_by_length exclude each other: packed rows are all "
            "train.seq_len long; set one of them to false"
        )


def load(path: str) -> DictConfig:
    """Read a resolved config file (what every rank reads) and validate it against the schema."""
    raw = OmegaConf.load(path)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    validate(cfg)
    return cfg


def _leaf_fields(schema: type, prefix: str = ""):
    """(dotted key, dataclass field) of every leaf of the schema."""
    hints = type_hints(schema)
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def path_keys() -> dict[str, dict]:
    """Dotted keys of the fields that name files, directories or URIs (`pathlike`), with their metadata;
    `data.sources[*].KEY` stands for that key in each data.sources entry."""
    keys = {k: dict(f.metadata) for k, f in _leaf_fields(Config) if "path" in f.metadata}
    keys.update(
        {f"data.sources[*].{k[5:]}": m for k, m in list(keys.items()) if k.startswith("data.") and k[5:] in SOURCE_KEYS}
    )
    return keys


def resume_free_keys(schema: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys the schema marks as free to change on resume; a group marked free is its name."""
    hints = type_hints(schema)
    keys: list[str] = []
    for f in fields(schema):
        key = prefix + f.name
        if f.metadata.get("resume") == "free":
            keys.append(key)
        elif is_dataclass(hints[f.name]):
            keys.extend(resume_free_keys(hints[f.name], key + "."))
    return tuple(keys)


@dataclass(frozen=True)
class KeyInfo:
    """What the schema says about one key, for help texts."""

    key: str
    type: str  # `int`, `float`, `bool`, `str`, or the choices `a|b|c`; `|null` when it may be null
    default: Any
    range: str  # `>= 1`, `> 0`, `0 .. 0.99`, or ""


def is_union(hint: Any) -> bool:
    """`X | None` and `Optional[X]` alike (get_type_hints gives the first as types.UnionType)."""
    return get_origin(hint) in (Union, UnionType)


def type_name(hint: Any) -> str:
    if is_union(hint):
        named = [type_name(h) for h in get_args(hint) if h is not type(None)]
        return "|".join(named) + ("|null" if type(None) in get_args(hint) else "")
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "|".join(hint.__members__)
    return getattr(hint, "__name__", str(hint))


def _range_text(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"{lo} .. {hi}"
    if lo is not None:
        return f"{'>' if meta.get('lo_open') else '>='} {lo}"
    return f"<= {hi}" if hi is not None else ""


def describe(key: str, schema: type = Config) -> KeyInfo:
    """Type, schema default and range of a dotted key (`lora.r`)."""
    head, _, rest = key.partition(".")
    f = next((f for f in fields(schema) if f.name == head), None)
    if f is None:
        raise KeyError(key)
    hint = type_hints(schema)[head]
    if rest:
        return replace(describe(rest, hint), key=key)
    default = f.default_factory() if f.default_factory is not NO_DEFAULT else f.default
    return KeyInfo(key, f.metadata.get("type") or type_name(hint), default, _range_text(dict(f.metadata)))


def dotted(tree: dict, key: str, missing=None):
    """The value at dotted `key` (`lora.r`) of a plain nested dict, or `missing` where the path is absent."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return missing
        tree = tree[part]
    return tree


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain data (choices as their words), secrets redacted: what files and logs get."""
    return redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def _is_secret(key: str) -> bool:
    k = str(key).lower()
    return k == "token" or k.endswith(("_token", "api_key", "apikey")) or "password" in k or "secret" in k


# the keys a data.sources entry takes besides `weight`
SOURCE_KEYS = frozenset({f.name for f in fields(DataConfig)} - {"sources", "name"})


def _check_data_sources(cfg) -> None:
    """Each data.sources entry is a mapping of data.* keys (plus weight > 0) that names its data."""
    allowed = SOURCE_KEYS
    for i, entry in enumerate(cfg.data.get("sources") or []):
        where = f"data.sources[{i}]"
        if not isinstance(entry, (dict, DictConfig)):
            raise ConfigError(f"{where}={entry!r}: give a mapping such as {{path: FILE, weight: 1}}")
        unknown = sorted(set(entry) - allowed - {"weight"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; an entry takes weight and data.* keys")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{where}.weight={weight!r} must be a number > 0")
        if not entry.get("path") and (entry.get("source", cfg.data.source) not in ("demo", "synthetic")):
            raise ConfigError(f"{where}: no path; give the file, directory or hub name of this source")


ALL_LINEAR = "all-linear"


def lora_targets(cfg) -> str | list[str]:
    """lora.target_modules as PEFT takes it: `all-linear`, or a non-empty list of module names."""
    targets = cfg.lora.target_modules
    if targets in (ALL_LINEAR, "all_linear"):
        return ALL_LINEAR
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets) if targets is not None and not isinstance(targets, (int, float, bool)) else None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f"lora.target_modules={cfg.lora.target_modules!r}: give module names (e.g. [q_proj,v_proj]) or {ALL_LINEAR}"
        )
    return targets


def redact(tree: Any) -> Any:
    """Copy of a plain config tree with secret-looking values replaced, for files and logs."""
    if isinstance(tree, dict):
        return {k: ("<redacted>" if _is_secret(k) and v else redact(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree
