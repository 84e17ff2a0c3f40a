"""`lora-launch --help`, and the subcommands `generate`, `merge`, `eval`, `serve` and `sweep-summary`.

The help is the project's own: the config groups read from the installed conf directory, the
most used keys with their type, default and range from the schema. The subcommands take
`key=value` arguments typed in conf/args.py; `generate`, `merge` and `eval` then run
`python -m lora_launch.train.posttrain` as their own process, as training runs `-m lora_launch.train`,
and `serve` runs `python -m lora_launch.serve`: the launcher imports neither.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

import yaml

from lora_launch.conf.args import COMMANDS, parse_args, usage
from lora_launch.conf.schema import ConfigError, describe, dotted
from lora_launch.launcher.runs import HELP as RUNS_HELP

POSTTRAIN_MODULE = "lora_launch.train.posttrain"
SERVE_MODULE = "lora_launch.serve"  # `serve` runs in its own process too, above the training code
STUDIO_MODULE = "lora_launch.studio"  # the web app sits above the launcher: its own process as well
STUDIO_HELP = "A local web app to compose, preview, launch and watch runs: studio [--port P] [--root DIR]."
MOST_USED = ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "optim.lr", "train.max_steps",
             "train.epochs", "train.micro_batch_size", "train.grad_accum", "train.global_batch_size",
             "train.seq_len", "train.precision", "train.grad_ckpt", "quant.mode", "launcher.num_processes",
             "run.dir", "eval.every_steps", "checkpoint.every_steps", "checkpoint.keep_last", "resume.mode",
             "resume.allow_changes", "seed", "preview", "data.format", "data.template", "data.sources",
             "data.packing", "data.packing_strategy",
             "optim.name", "model.attn_implementation", "launcher.max_restarts", "launcher.accelerate_config",
             "distributed.deepspeed_config", "sweep.parallel", "sweep.prune", "sweep.search", "sweep.trials")


def _conf_dir():
    return importlib.resources.files("lora_launch.conf")


def config_groups() -> dict[str, list[str]]:
    """Each config group of the installed conf directory, with its options."""
    groups = {}
    for entry in sorted(_conf_dir().iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            options = sorted(p.name.removesuffix(".yaml") for p in entry.iterdir() if p.name.endswith(".yaml"))
            if options:
                groups[entry.name] = options
    return groups


def _primary() -> dict:
    """conf/config.yaml as written (interpolations unresolved): its defaults list and key values."""
    return yaml.safe_load(_conf_dir().joinpath("config.yaml").read_text()) or {}


def _default_choices(primary: dict) -> dict[str, str]:
    return {k: str(v) for entry in primary.get("defaults", []) if isinstance(entry, dict) for k, v in entry.items()}


def _groups_text(primary: dict) -> list[str]:
    chosen = _default_choices(primary)
    lines = []
    for group, options in config_groups().items():
        if group == "model_recipe":
            shown = f"picked automatically from model= when one exists ({', '.join(options)})"
        else:
            shown = ", ".join(o + ("*" if chosen.get(group) == o else "") for o in options)
        lines.append(f"  {group:<14} {shown}")
    return lines


def _shown(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(_shown, value)) + "]"
    return str(value)


def _keys_text(primary: dict) -> list[str]:
    rows = [("key", "type", "default", "range")]
    for key in MOST_USED:
        info = describe(key)
        # config.yaml's value where it sets one (run.dir's timestamp), else the schema's default
        rows.append((key, info.type, _shown(dotted(primary, key, info.default)), info.range))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {r}".rstrip() for k, t, d, r in rows]


def help_text() -> str:
    """The text of `lora-launch --help`."""
    primary = _primary()
    width = max(map(len, COMMANDS))
    commands = [f"  {name:<{width}}  {schema.__doc__.strip().splitlines()[0]}" for name, schema in COMMANDS.items()]
    commands += [f"  {name:<{width}}  {line}" for name, line in RUNS_HELP.items()]  # flags, not key=value
    commands.append(f"  {'studio':<{width}}  {STUDIO_HELP}")
    return "\n".join([
        "usage: lora-launch [group=option ...] [key=value ...]    train (preview=true: show the plan, start nothing)",
        "       lora-launch -m key=a,b ...                         a sweep: one full launch per combination",
        "       lora-launch COMMAND key=value ...                  after training or a sweep",
        "       lora-launch COMMAND --help                         that command's keys",
        "",
        "Commands:", *commands,
        "",
        "Config groups (group=option; * marks the default):", *_groups_text(primary),
        "",
        "Most used keys (any key of the config can be set: key=value):", *_keys_text(primary),
        "",
        "A bad key or value fails before anything starts, naming the key. Hydra's own options still work:",
        "--cfg job prints the composed config, --hydra-help Hydra's help, -m/--multirun sweeps.",
    ])


def run_command(name: str, argv: list[str]) -> int:
    """Run subcommand `name` with its `key=value` arguments; a bad argument is one line and exit 2."""
    if "--help" in argv or "-h" in argv:
        print(usage(name))
        return 0
    if name == "sweep-summary" and len(argv) == 1 and "=" not in argv[0]:
        argv = [f"dir={argv[0]}"]  # the earlier `lora-launch sweep-summary DIR`
    try:
        args = parse_args(name, argv)
        if name == "sweep-summary":
            return sweep_summary(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    if name == "serve":
        os.execv(sys.executable, [sys.executable, "-m", SERVE_MODULE, *argv])
    os.execv(sys.executable, [sys.executable, "-m", POSTTRAIN_MODULE, name, *argv])
    return 1  # not reached: execv replaces this process


def run_studio(argv: list[str]) -> int:
    """`lora-launch studio [flags]`: run `python -m lora_launch.studio` in place of this process."""
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", STUDIO_MODULE, *argv])
    return 1  # not reached


def sweep_summary(args) -> int:
    """`lora-launch sweep-summary dir=SWEEP_DIR`: rebuild the summary files from the trial dirs."""
    from lora_launch.launcher.sweep import print_summary

    if not Path(args.dir).is_dir():
        raise ConfigError(f"sweep-summary: dir={args.dir} is not a directory")
    print_summary(Path(args.dir))
    return 0
