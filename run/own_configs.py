"""A user's own accelerate config and DeepSpeed JSON (`launcher.accelerate_config`,
`distributed.deepspeed_config`): read, laid under what this run requires, refused in one line where
they disagree with it.

The run's config stays the one source of what trains: a value the run derives (batch sizes, precision,
ZeRO stage, process counts) may be absent from the user's file, equal to the run's, or `auto`; any
other value is a conflict, named with the key that sets it. Everything else in the file (bucket sizes,
offload details, communication settings, accelerate's dynamo or rendezvous options) is kept.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from lora_launch.conf.schema import ConfigError

# DeepSpeed JSON paths the run sets, and the config key each comes from
DEEPSPEED_OWNED = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("train_batch_size",): "train.global_batch_size (micro x accum x world)",
    ("gradient_clipping",): "optim.max_grad_norm",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
    ("zero_optimization", "stage"): "distributed.zero_stage",
}
DEEPSPEED_REFUSED = {"optimizer": "optim.*", "scheduler": "optim.scheduler"}  # the loop brings its own

# accelerate config keys the run sets
ACCELERATE_OWNED = {
    ("num_processes",): "launcher.num_processes (x num_machines)",
    ("num_machines",): "launcher.num_machines",
    ("machine_rank",): "launcher.machine_rank / the node's rank",
    ("distributed_type",): "distributed",
    ("mixed_precision",): "train.precision",
    ("main_process_port",): "launcher.main_process_port",
    ("use_cpu",): "the machine (GPUs are used when there are any)",
    ("deepspeed_config", "deepspeed_config_file"): "distributed.deepspeed_config (merged into RUN/ds_config.json)",
}


def read(path: str, key: str) -> dict:
    """The mapping in a YAML or JSON file, or ConfigError naming `key`."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{key}={path}: cannot read it ({e.strerror})") from None
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"{key}={path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'} ({first})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _get(tree: dict, path: tuple[str, ...]):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _drop(tree: dict, path: tuple[str, ...]) -> None:
    parent = _get(tree, path[:-1]) if len(path) > 1 else tree
    if isinstance(parent, dict):
        parent.pop(path[-1], None)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _merge(ours: dict, user: dict, owned: dict, key: str, path: str) -> dict:
    """`user` laid under `ours`: owned values must agree (or be absent or `auto`)."""
    for where, source in owned.items():
        theirs, mine = _get(user, where), _get(ours, where)
        if theirs is None or theirs == "auto" or theirs == mine:
            continue
        dotted = ".".join(where)
        if mine is None:
            raise ConfigError(
                f"{key}={path}: {dotted} cannot be set for this run ({source} decides it); remove it from the file"
            )
        raise ConfigError(
            f"{key}={path}: {dotted} is {theirs!r} but this run has {mine!r} (from {source}); "
            f"remove it from the file (or write auto), or change {source.split(' ')[0]}"
        )
    merged = _deep_merge(ours, user)
    for where in owned:
        mine = _get(ours, where)
        if mine is None:
            _drop(merged, where)
        else:
            _set(merged, where, mine)
    return merged


def merged_deepspeed(ours: dict, path: str | None) -> dict:
    """The DeepSpeed JSON of the run: distributed.deepspeed_config (when given) under what the run sets."""
    if not path:
        return ours
    key = "distributed.deepspeed_config"
    user = read(path, key)
    for section, instead in DEEPSPEED_REFUSED.items():
        if section in user:
            raise ConfigError(
                f"{key}={path}: remove its {section!r} section; the training loop brings its own (set {instead})"
            )
    return _merge(ours, user, DEEPSPEED_OWNED, key, path)


def merged_accelerate(ours: dict, path: str | None) -> dict:
    """The accelerate config of the run: launcher.accelerate_config (when given) under what the run sets."""
    if not path:
        return ours
    key = "launcher.accelerate_config"
    user = read(path, key)
    if str(user.get("distributed_type", "")).upper() in ("FSDP", "MEGATRON_LM", "XLA", "TPU"):
        raise ConfigError(
            f"{key}={path}: distributed_type {user['distributed_type']} is not one this launcher runs; "
            "choose distributed=ddp|zero2|zero3|zero3_offload|fsdp2|fsdp2_offload and remove it from "
            "the file"
        )
    return _merge(ours, user, ACCELERATE_OWNED, key, path)
