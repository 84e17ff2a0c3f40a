"""`lora-launch --help`, and the subcommands `generate`, `merge`, `eval`, `serve`, `studio` and `sweep-summary`.

The help is the project's own: the config groups read from the installed conf directory, the
most used keys with their type, default and range from the schema. The subcommands take
`key=value` arguments typed in conf/args.py; `generate`, `merge` and `eval` then run
`python -m lora_launch.train.posttrain` as their own process, as training runs `-m lora_launch.train`,
`serve` runs `python -m lora_launch.serve` and `studio` `python -m lora_launch.studio` (its key=value
arguments passed on as the studio's flags): the front door imports none of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lora_launch.catalog.terminal import terminal_width, wrap
from lora_launch.cli.runs import HELP as RUNS_HELP
from lora_launch.conf.args import COMMANDS, StudioArgs, keys, parse_args, usage
from lora_launch.conf.errors import reports_user_errors
from lora_launch.conf.groups import config_groups, default_choices, primary_config
from lora_launch.conf.schema import ConfigError, describe
from lora_launch.run.process import replace_process

POSTTRAIN_MODULE = "lora_launch.train.posttrain"
SERVE_MODULE = "lora_launch.serve"  # `serve` runs in its own process too, above the training code
STUDIO_MODULE = "lora_launch.studio"  # the web app: its own process as well
MOST_USED = (
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "optim.lr",
    "train.max_steps",
    "train.epochs",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.global_batch_size",
    "train.seq_len",
    "train.precision",
    "train.grad_ckpt",
    "quant.mode",
    "launcher.num_processes",
    "run.dir",
    "eval.every_steps",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "resume.mode",
    "resume.allow_changes",
    "seed",
    "preview",
    "data.format",
    "data.template",
    "data.sources",
    "data.packing",
    "data.packing_strategy",
    "optim.name",
    "model.attn_implementation",
    "launcher.max_restarts",
    "launcher.accelerate_config",
    "distributed.deepspeed_config",
    "sweep.parallel",
    "sweep.prune",
    "sweep.search",
    "sweep.trials",
)


def _groups_text(primary: dict) -> list[str]:
    chosen = default_choices(primary)
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


def _keys_text() -> list[str]:
    width = max(map(len, MOST_USED))
    lines = []
    for key in MOST_USED:
        info = describe(key)
        # the schema's default (conf/config.yaml sets no key); choices are spaced so that a narrow terminal can fold
        text = "; ".join(filter(None, [info.type.replace("|", " | "), f"default {_shown(info.default)}", info.range]))
        lines.append(f"  {key:<{width}}  {text}")
    return lines


def help_text(width: int | None = None) -> str:
    """The text of `lora-launch --help`, folded to `width` columns (None: the terminal's)."""
    primary = primary_config()
    names = max(map(len, [*COMMANDS, *RUNS_HELP]))
    commands = [f"  {name:<{names}}  {schema.__doc__.strip().splitlines()[0]}" for name, schema in COMMANDS.items()]
    commands += [f"  {name:<{names}}  {line}" for name, line in RUNS_HELP.items()]  # flags, not key=value
    return wrap(
        "\n".join(
            [
                "usage: lora-launch [group=option ...] [key=value ...]  train (preview=true: show the plan, start nothing)",
                "       lora-launch -m key=a,b ...                      a sweep: one full launch per combination",
                "       lora-launch COMMAND key=value ...               after training or a sweep",
                "       lora-launch COMMAND --help                      that command's keys",
                "",
                "Commands:",
                *commands,
                "",
                "Config groups (group=option; * marks the default):",
                *_groups_text(primary),
                "",
                "Most used keys: type; default; range (any key of the config can be set: key=value):",
                *_keys_text(),
                "",
                "A bad key or value fails before anything starts, naming the key. Hydra's own options work anywhere "
                "on the line: --cfg job prints the composed config, --info what Hydra found, --hydra-help Hydra's help, "
                "-m/--multirun sweeps.",
            ]
        ),
        terminal_width() if width is None else width,
    )


@reports_user_errors
def run_command(name: str, argv: list[str]) -> int:
    """Run subcommand `name` with its `key=value` arguments; a bad argument is one line and exit 2."""
    if "--help" in argv or "-h" in argv:
        print(wrap(usage(name), terminal_width()))
        return 0
    if name == "sweep-summary" and len(argv) == 1 and "=" not in argv[0]:
        argv = [f"dir={argv[0]}"]  # the earlier `lora-launch sweep-summary DIR`
    if name == "studio":
        argv = studio_flags(argv)
    else:
        args = parse_args(name, argv)
    if name == "sweep-summary":
        return sweep_summary(args)
    sys.stdout.flush()
    if name in ("serve", "studio"):
        replace_process([sys.executable, "-m", SERVE_MODULE if name == "serve" else STUDIO_MODULE, *argv])
    replace_process([sys.executable, "-m", POSTTRAIN_MODULE, name, *argv])


# the studio's own flags, each followed by its value; they stay aliases of host=, port=, root=, allow_path=
STUDIO_FLAGS = ("--host", "--port", "--root", "--allow-path")


def studio_flags(argv: list[str]) -> list[str]:
    """`studio` arguments as the studio's flags: `port=8001 allow_path=[a,b]` -> `--port 8001 --allow-path a
    --allow-path b` (typed and checked here, as every subcommand's are); flags pass through as given."""
    flags, pairs = [], []
    for i, arg in enumerate(argv):
        is_flag_value = i > 0 and argv[i - 1] in STUDIO_FLAGS
        (pairs if "=" in arg and not arg.startswith("-") and not is_flag_value else flags).append(arg)
    args = parse_args("studio", pairs)
    for key in keys(StudioArgs):
        if any(p.startswith(key + "=") for p in pairs):
            value = getattr(args, key)
            for one in value if isinstance(value, list) else [value]:
                flags += ["--" + key.replace("_", "-"), str(one)]
    return flags


def sweep_summary(args) -> int:
    """`lora-launch sweep-summary dir=SWEEP_DIR`: rebuild the summary files from the trial dirs."""
    from lora_launch.sweep.trials import print_summary

    if not Path(args.dir).is_dir():
        raise ConfigError(f"sweep-summary: dir={args.dir} is not a directory")
    print_summary(Path(args.dir))
    return 0
