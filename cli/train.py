"""`lora-launch [group=option ...] [key=value ...]`: compose the config once (conf/compose.py), make the run dir,
then preview, submit to Slurm or launch training on this node. Hydra's flags that print (--cfg, --info,
--hydra-help, --shell-completion) are Hydra's own."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, open_dict

from lora_launch.conf.compose import compose_checked, hydra_flags, hydra_prints, launch_dir, resolve_run, task_overrides
from lora_launch.conf.errors import UserError
from lora_launch.conf.schema import ConfigError
from lora_launch.launcher.checks import (
    check_before_launch,
    check_data,
    check_finished_config,
    run_dir_given,
    warmup_warning,
)
from lora_launch.launcher.topology import run_plan, topology
from lora_launch.run.lock import in_use
from lora_launch.run.process import exit_on_closed_stdout
from lora_launch.run.rundir import fault_message, finished_step, missing_folders, read_status
from lora_launch.sweep.trials import register_resolvers


class Made(NamedTuple):
    """What this command creates on disk, as seen before Hydra makes the run dir."""

    run_dir: bool  # the run dir did not exist
    above: Path | None  # the topmost missing folder above it (runs/ in a fresh directory), made with it


def first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` (itself included) that does not exist yet: what creating `path` makes."""
    missing = missing_folders(path)
    return missing[-1] if missing else None


def _job(cfg: DictConfig, overrides: list[str], made: Made) -> int:
    """One launch into cfg.run.dir (a sweep's trials are launches too: sweep/sweeper.py)."""
    try:
        rc = _launch(cfg, overrides, made)
    except UserError:
        _remove_if_made(Path(cfg.run.dir), made)
        raise
    except BrokenPipeError:  # `lora-launch preview=true | head -1`; here, as Hydra reports what _job raises
        _remove_if_made(Path(cfg.run.dir), made)
        exit_on_closed_stdout()
    except OSError as e:  # disk full or read-only while writing the launch files: one line, nothing lost
        message = fault_message(e, where=cfg.run.dir)
        if message is None:
            raise
        _remove_if_made(Path(cfg.run.dir), made)
        raise UserError(message) from None
    if rc != 0:
        sys.exit(rc)  # run_node said why
    return rc


def _remove_if_made(run_dir: Path, made: Made) -> None:
    """A refused launch or a preview leaves no new run dir behind: the one made for it goes, with what the launch
    wrote there (locks, the marker, a file a full disk cut short) and the empty folders made above it, unless a
    live launch holds it (two launches in the same second share the timestamped default) or a run trained
    there. A dir that existed before stays as it is."""
    if made.run_dir and not in_use(run_dir) and not read_status(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in Path(os.path.abspath(run_dir)).parents if made.above else []:
            try:
                folder.rmdir()  # only while empty: another launch may have put its run dir there meanwhile
            except OSError:
                break
            if folder == made.above:
                break


def _launch(cfg: DictConfig, overrides: list[str], made: Made) -> int:
    """Validate, check, then preview, submit to Slurm or launch this node; returns the exit code."""
    resolve_run(cfg)
    topo = topology(cfg, strict=not cfg.preview)
    plan = run_plan(cfg, topo)
    check_before_launch(cfg, topo, plan, run_dir_given(overrides))
    warning = warmup_warning(cfg)
    if warning:  # here, in the one launcher process, not once per rank; stdout: stderr is for the one error line
        print(f"warning: {warning}", flush=True)
    run_dir = Path(cfg.run.dir)
    if cfg.preview:
        from lora_launch.launcher.preview import preview

        print(preview(cfg, topo, plan, overrides), flush=True)
        _remove_if_made(run_dir, made)  # the dir made for this preview: a preview creates nothing
        return 0
    if cfg.launcher.name == "slurm":
        from lora_launch.launcher.slurm import submit

        check_data(cfg)  # here, not minutes later in the queue
        return submit(cfg, topo, plan)
    from lora_launch.launcher.node import run_node

    done = finished_step(run_dir, cfg.resume.mode)
    if done is not None:  # before run_node, which would rewrite the finished run's files
        check_finished_config(cfg)
        print(
            f"{run_dir}: this run already finished at step {done}; nothing to do (resume.mode=never starts it over)",
            flush=True,
        )
        return 0
    check_data(cfg)
    return run_node(cfg, topo, plan)


def _override_text(arg: str) -> str:
    """The value of `key=value` as Hydra reads it (a sweep quotes its trial dirs: they hold `=` and `,`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        value = OverridesParser.create().parse_overrides([arg])[0].value()
    except HydraException:
        value = None
    return value if isinstance(value, str) else arg.split("=", 1)[1]


def _run_dir_arg(argv: list[str]) -> Path | None:
    """The run.dir the command line names (None: the timestamped default, or a value Hydra interpolates)."""
    given = [_override_text(a) for a in argv if a.startswith(("run.dir=", "hydra.run.dir="))]
    return Path(given[-1]) if given and "${" not in given[-1] else None


def _check_run_dir_arg(run_dir: Path | None) -> None:
    """Refuse an unwritable run.dir in one line before composing and creating it."""
    from lora_launch.launcher.checks import check_run_dir_writable

    if run_dir is not None:
        check_run_dir_writable(run_dir)


# Hydra's flags that take a value; --info takes one optionally, one of its topics
HYDRA_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def hydra_argv(args: list[str]) -> list[str]:
    """Hydra's flags (with their values) first, then the overrides: Hydra's parser reads overrides only up to
    its first flag, and a user writes `preset=x --cfg job` as readily as `--cfg job preset=x`. A bare --info
    goes last, where it cannot take an override for its topic."""
    flags, overrides, info = [], [], []
    takes_value = False
    for i, arg in enumerate(args):
        topic = i + 1 < len(args) and args[i + 1] in INFO_TOPICS
        if arg in ("--info", "-i") and not topic:
            info.append(arg)
        elif takes_value or arg.startswith("-"):
            flags.append(arg)
            takes_value = not takes_value and (arg in HYDRA_VALUE_FLAGS or (arg in ("--info", "-i") and topic))
        else:
            overrides.append(arg)
    return flags + overrides + info


def launch() -> None:
    """`lora-launch [flags] OVERRIDES` (sys.argv): one composition, then one launch; a bad choice, key or value is
    one line naming it, exit 2 (Hydra would print a block ending in its config search path)."""
    argv = hydra_argv(sys.argv[1:])
    args = hydra_flags(argv)
    if args.cfg or args.info is not None or args.hydra_help or args.shell_completion or args.experimental_rerun:
        register_resolvers()
        hydra_prints(argv)
        return
    if args.config_path is not None:
        raise ConfigError(
            "--config-path is not taken; give --config-dir DIR (searched before the installed conf/) "
            "and --config-name NAME"
        )
    given = _run_dir_arg(args.overrides)
    _check_run_dir_arg(given)
    # not yet validated: a value the schema refuses is the launch's to report, once it has seen the run dir
    cfg = compose_checked(
        args.overrides, check=False, config_dir=args.config_dir, config_name=args.config_name or "config"
    )
    run_dir = Path(launch_dir())
    with open_dict(cfg):
        cfg.run.dir = str(run_dir)
    # looked at before it is made: a refused launch or a preview removes only what it made
    made = Made(run_dir=not run_dir.exists(), above=first_missing(run_dir.parent))
    run_dir.mkdir(parents=True, exist_ok=True)
    _job(cfg, task_overrides(), made)
