"""Typed schema of the whole config tree, registered with Hydra's ConfigStore.

OmegaConf checks types and rejects unknown keys when the config is composed; the value
ranges (``lora.r >= 1``, ``optim.lr > 0``, ...) live next to each field as metadata and
are checked by :func:`validate`, so a bad value fails with its key's name before any
process starts.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that composes but cannot be used; the message names the key."""


def _range(lo=None, hi=None, *, lo_open=False, choices=None):
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}


def ranged(default, **kw):
    return field(default=default, metadata=_range(**kw))


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory; null builds the model from `arch` with random weights.
    path: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `path`
    revision: Optional[str] = None
    random_init: bool = False
    # LlamaConfig fields for random_init models (e.g. the 7B shape for benchmarks).
    arch: dict = field(default_factory=dict)
    dtype: str = ranged("auto", choices=["auto", "bfloat16", "float16", "float32"])
    attn_implementation: str = ranged("sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    trust_remote_code: bool = False


@dataclass
class DataFields:
    """Dataset columns the structured formats read (`data.fields.output=response`, ...)."""
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"  # optional per-record system prompt
    messages: str = "messages"
    label: str = "label"
    document: str = "document"
    summary: str = "summary"
    context: str = "context"
    question: str = "question"
    answer: str = "answer"


@dataclass
class DataConfig:
    name: str = MISSING
    # `demo` (bundled), `hub` (datasets.load_dataset(path)), `local` (a json/jsonl/csv/parquet
    # file or a directory of them), `synthetic` (random tokens for benchmarks: no file, no
    # tokenizer work).
    source: str = ranged("demo", choices=["demo", "hub", "local", "synthetic"])
    # local file or directory, or the hub dataset's name (data=hub: null takes `name`)
    path: Optional[str] = None
    revision: Optional[str] = None  # hub datasets: branch, tag or commit
    split: str = "train"
    # `text`: pre-formatted text in `text_field`; `instruction` (alpaca instruction/input/output),
    # `messages` (chat lists of {role, content}); task types `classification` (text_field + label),
    # `summary` (document + summary), `qa` (context + question + answer)
    format: str = ranged("instruction", choices=["text", "instruction", "messages", "classification",
                                                 "summary", "qa"])
    text_field: str = "text"
    fields: DataFields = field(default_factory=DataFields)
    # how structured formats are written out: `llama2` ([INST] … [/INST]), `alpaca`, `chatml`, or
    # `tokenizer` (the tokenizer's own chat template)
    template: str = ranged("llama2", choices=["llama2", "alpaca", "chatml", "tokenizer"])
    system_prompt: Optional[str] = None
    task_instruction: Optional[str] = None  # classification/summary/qa: replaces the default instruction
    label_names: list = field(default_factory=list)  # classification: names of integer labels, listed in the prompt
    val_split: float = ranged(0.05, lo=0.0, hi=0.9)  # share of records held out, drawn by `seed`
    val_split_name: Optional[str] = None  # the dataset's own validation split instead (e.g. validation)
    train_on_prompt: bool = False  # structured formats: false masks prompt tokens out of the loss
    truncation: bool = True  # false drops samples longer than train.seq_len instead of cutting them
    packing: bool = False  # pack samples into train.seq_len rows (no attention across samples)
    group_by_length: bool = False  # batches of similar length (not with packing)
    max_samples: int = ranged(-1, lo=-1)
    cache_dir: Optional[str] = None  # tokenised datasets; null: $LORA_LAUNCH_CACHE or ~/.cache/lora-launch
    # synthetic sample lengths: `full` (train.seq_len each) or `lognormal` (instruction-data-like)
    synthetic_lengths: str = ranged("full", choices=["full", "lognormal"])


@dataclass
class LoraConfig:
    r: int = ranged(8, lo=1)
    alpha: float = ranged(16.0, lo=0.0, lo_open=True)
    dropout: float = ranged(0.05, lo=0.0, hi=0.99)
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = ranged("none", choices=["none", "all", "lora_only"])


@dataclass
class QuantConfig:
    mode: str = ranged("none", choices=["none", "nf4"])
    compute_dtype: str = ranged("bfloat16", choices=["bfloat16", "float16", "float32"])
    double_quant: bool = True
    # storage dtype of the packed 4-bit weights; must match the compute dtype for ZeRO-3
    storage_dtype: str = ranged("uint8", choices=["uint8", "bfloat16", "float16", "float32"])
    # PEFT's prepare_model_for_kbit_training casts every non-4-bit weight (norms, embeddings,
    # lm_head) to float32; false keeps them in the compute dtype: less memory, faster steps
    upcast_frozen: bool = False


@dataclass
class OptimConfig:
    # adamw_torch, or bitsandbytes' PagedAdamW32bit (the QLoRA recipe; unpaged on CPU)
    name: str = ranged("adamw_torch", choices=["adamw_torch", "paged_adamw_32bit"])
    lr: float = ranged(2e-4, lo=0.0, lo_open=True)
    weight_decay: float = ranged(0.0, lo=0.0)
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = ranged(1e-8, lo=0.0, lo_open=True)
    scheduler: str = ranged("cosine", choices=["constant", "cosine", "linear"])
    warmup_steps: int = ranged(0, lo=0)
    warmup_ratio: float = ranged(0.0, lo=0.0, hi=1.0)
    max_grad_norm: float = ranged(1.0, lo=0.0)  # 0 disables clipping


@dataclass
class DistributedConfig:
    name: str = MISSING
    strategy: str = ranged("ddp", choices=["ddp", "deepspeed"])
    zero_stage: int = ranged(0, lo=0, hi=3)
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class SlurmConfig:
    nodes: int = ranged(1, lo=1)
    gpus_per_node: int = ranged(0, lo=0)  # 0: request no GPUs (CPU jobs)
    cpus_per_task: int = ranged(0, lo=0)  # 0: leave it to the cluster's default
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None  # sbatch --time, e.g. "04:00:00"
    # SIGTERM this many seconds before the time limit: the run checkpoints and is requeued
    signal_before_s: int = ranged(120, lo=0)
    extra: list = field(default_factory=list)  # more `#SBATCH` lines, e.g. ["--exclusive"]
    submit: bool = True  # false: only write RUN/slurm.sbatch


@dataclass
class LauncherConfig:
    name: str = MISSING
    # int, or "auto": every visible GPU (1 process on CPU); per node
    num_processes: Any = "auto"
    num_machines: int = ranged(1, lo=1)
    machine_rank: int = ranged(0, lo=0)
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = ranged(29500, lo=1, hi=65535)
    # launcher=hostfile: DeepSpeed-style hostfile; the first host is the rendezvous
    hostfile: Optional[str] = None
    # this node's line in the hostfile (0-based); null: found from the host's names and addresses
    node_rank: Optional[int] = ranged(None, lo=0)
    # interface for GLOO/NCCL_SOCKET_IFNAME; null: the one that routes to the rendezvous address
    network_interface: Optional[str] = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class WandbConfig:
    mode: str = ranged("disabled", choices=["offline", "online", "disabled"])
    project: str = "lora-launch"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    every_steps: int = ranged(1, lo=1)
    progress_bar: bool = True
    tensorboard: bool = True
    # per-rank record of samples and weight digests (ranks/rank*.jsonl), for auditing sync
    rank_audit: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    max_steps: int = ranged(-1, lo=-1)  # -1: run `epochs` epochs
    epochs: float = ranged(1.0, lo=0.0, lo_open=True)
    micro_batch_size: int = ranged(4, lo=1)
    grad_accum: int = ranged(1, lo=1)
    seq_len: int = ranged(512, lo=8)
    grad_ckpt: bool = False
    precision: str = ranged("auto", choices=["auto", "bf16", "fp16", "fp32"])
    num_workers: int = ranged(0, lo=0)
    threads: int = ranged(0, lo=0)  # torch intra-op threads per process; 0 leaves torch's choice
    # torch.compile: `layers` (decoder layers and loss), `loss` (loss only), `none`; `auto` is
    # `layers` on GPUs (`loss` under ZeRO-3, whose sharded weights dynamo cannot trace) and `none` on CPU
    compile: str = ranged("auto", choices=["auto", "layers", "loss", "none"])
    # optional: micro_batch_size x grad_accum x world size must equal it (checked before launch)
    global_batch_size: Optional[int] = ranged(None, lo=1)


@dataclass
class EvalConfig:
    every_steps: int = ranged(0, lo=0)  # 0: only at the start and the end
    at_start: bool = True
    max_batches: int = ranged(-1, lo=-1)


@dataclass
class CheckpointConfig:
    every_steps: int = ranged(0, lo=0)  # 0: no periodic checkpoints
    keep_last: int = ranged(2, lo=1)


@dataclass
class ResumeConfig:
    # auto: continue from the newest complete checkpoint in run.dir; never: start over
    # (earlier checkpoints and metrics are moved aside); or the path of one checkpoint directory
    mode: str = "auto"
    # config keys that may differ from the checkpoint's (e.g. [optim.lr, train.max_steps]);
    # `data` and `tokenizer` also accept a changed tokenised dataset or tokenizer
    allow_changes: list = field(default_factory=list)


@dataclass
class RunConfig:
    dir: str = MISSING


@dataclass
class SweepConfig:
    continue_on_failure: bool = True


@dataclass
class SampleConfig:
    prompt: str = "[INST] Where is Italy? [/INST]"
    max_new_tokens: int = ranged(48, lo=0)


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = MISSING
    launcher: LauncherConfig = MISSING
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seed: int = ranged(0, lo=0)
    preview: bool = False


def asset_path(name: str) -> str:
    """Absolute path of a file or directory shipped in conf/assets (the `${asset:...}` resolver)."""
    return str(importlib.resources.files("lora_launch.conf").joinpath("assets", name))


def register() -> None:
    """Register the schema so `conf/config.yaml` can name it in its defaults list."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in [("model", ModelConfig), ("data", DataConfig), ("lora", LoraConfig),
                        ("quant", QuantConfig), ("optim", OptimConfig),
                        ("distributed", DistributedConfig), ("launcher", LauncherConfig),
                        ("logging", LoggingConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)


def _check_field(key: str, value: Any, meta: dict) -> None:
    if value is None or not meta:
        return
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {choices}")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ConfigError(f"{key}={value} must be {'>' if meta.get('lo_open') else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value} must be <= {hi}")


def _walk(prefix: str, schema_cls: type, node: DictConfig) -> None:
    hints = get_type_hints(schema_cls)
    for f in fields(schema_cls):
        key, value = f"{prefix}{f.name}", node[f.name]
        if is_dataclass(hints[f.name]):
            _walk(key + ".", hints[f.name], value)
        else:
            _check_field(key, value, dict(f.metadata))


def validate(cfg: DictConfig) -> None:
    """Check value ranges and cross-field rules; raise ConfigError naming the key."""
    _walk("", Config, cfg)
    n = cfg.launcher.num_processes
    if not (n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)):
        raise ConfigError(f"launcher.num_processes={n!r} must be a positive integer or 'auto'")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules is empty: name at least one module (e.g. [q_proj,v_proj])")
    if cfg.distributed.strategy == "deepspeed" and cfg.distributed.zero_stage not in (2, 3):
        raise ConfigError(f"distributed.zero_stage={cfg.distributed.zero_stage}: DeepSpeed here runs ZeRO stage 2 or 3")
    if cfg.model.path is None and not cfg.model.random_init:
        raise ConfigError("model.path is null: give a hub id or local directory, or set model.random_init=true")
    _validate_data(cfg.data)
    _validate_resume(cfg.resume)


def _validate_resume(r: DictConfig) -> None:
    if r.mode not in ("auto", "never") and not (Path(r.mode) / "manifest.json").is_file():
        raise ConfigError(f"resume.mode={r.mode}: not auto, never or a checkpoint directory "
                          "(run.dir/checkpoints/step-N, with its manifest.json)")


def _validate_data(d: DictConfig) -> None:
    if d.packing and d.group_by_length:
        raise ConfigError("data.packing and data.group_by_length exclude each other: packed rows are all "
                          "train.seq_len long; set one of them to false")


def load(path: str) -> DictConfig:
    """Read a resolved config file (what every rank reads) and validate it against the schema."""
    raw = OmegaConf.load(path)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    validate(cfg)
    return cfg


def _is_secret(key: str) -> bool:
    k = str(key).lower()
    return k == "token" or k.endswith(("_token", "api_key", "apikey")) or "password" in k or "secret" in k


def redact(tree: Any) -> Any:
    """Copy of a plain config tree with secret-looking values replaced, for files and logs."""
    if isinstance(tree, dict):
        return {k: ("<redacted>" if _is_secret(k) and v else redact(v))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree
