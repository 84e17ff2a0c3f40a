"""The one way a config is composed: `lora-launch`'s launches, sweeps, the studio, direct `accelerate launch` and the
tests all call :func:`compose`, which runs Hydra on the installed conf/ (a user's `--config-dir` before it) and
resolves the result once.

Every default lives in the schema (conf/schema.py), registered here as the base of conf/config.yaml's defaults
list; the YAML files hold only what a choice changes.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lora_launch.conf.schema import Config, ConfigError, asset_path, plain, validate

__all__ = [
    "compose",
    "compose_checked",
    "composition_error",
    "hydra_flags",
    "hydra_prints",
    "launch_dir",
    "parse_overrides",
    "plain",
    "register",
    "resolve_run",
    "sweep_dir",
    "task_overrides",
]  # plain: schema's

CONF_PACKAGE = "pkg://lora_launch.conf"
# Hydra's own settings: a run's dir is run.dir and a sweep's is named from its command line (sweep/trials.py);
# Hydra writes nothing of its own there (the launch records its command: launcher/node.py) and keeps the working
# directory
HYDRA_SETTINGS = {
    "run": {"dir": "${run.dir}"},
    "sweep": {"dir": "sweeps/${sweep_name:}", "subdir": "${trial_name:${hydra.overrides.task}}"},
    "job": {"chdir": False, "name": "train"},
    "output_subdir": ".hydra",
}
# Hydra's state is global: one composition at a time (the studio composes from several threads)
_ONE_AT_A_TIME = threading.RLock()


def register() -> None:
    """Register the schema, with Hydra's settings, as `schema`: the first entry of conf/config.yaml's defaults.

    Only the root: it types the whole tree, so every group's options are checked when they merge into it, and no
    `<group>_schema` entry shows up as a choice of its own. Once: the store hands each composition a copy of its
    node, so building the node (some 15 ms) again for each one changes nothing."""
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    if "schema.yaml" in ConfigStore.instance().repo:
        return
    node = OmegaConf.structured(Config)
    with open_dict(node):
        node.hydra = HYDRA_SETTINGS
    ConfigStore.instance().store(name="schema", node=node)


@contextmanager
def _hydra(config_dir: str | None = None):
    """Hydra set up as `lora-launch` runs it: the installed conf/, with a user's --config-dir searched first."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals

    register()
    setup_globals()  # the `now` resolver
    search_path = create_automatic_config_search_path(None, None, CONF_PACKAGE)
    if config_dir is not None:
        path = os.path.abspath(config_dir)
        if not os.path.isdir(path):
            raise ConfigError(f"Additional config directory '{path}' not found")
        search_path.prepend(provider="command-line", path=f"file://{path}", anchor=SearchPathQuery(provider="schema"))
    with _ONE_AT_A_TIME:
        GlobalHydra.instance().clear()
        try:
            yield Hydra.create_main_hydra2(task_name="train", config_search_path=search_path)
        finally:
            GlobalHydra.instance().clear()


def compose(
    overrides: list[str], check: bool = True, config_dir: str | None = None, config_name: str = "config"
) -> DictConfig:
    """The config `lora-launch <overrides>` uses, resolved once (check: and validated), without Hydra's output dirs
    or chdir. As under `@hydra.main`, `HydraConfig.get()` then answers for this composition (the command's
    overrides, and :func:`launch_dir` and :func:`sweep_dir`). Hydra's and OmegaConf's composition errors are raised
    as they are; :func:`compose_checked` makes them one line.

    check=False: resolved, not validated: the launch validates once it has seen the run dir."""
    from hydra.core.hydra_config import HydraConfig

    with _hydra(config_dir) as hydra:
        cfg = _composed(hydra, list(overrides), config_dir, config_name)
        HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    if check:
        resolve_run(cfg)
    else:
        OmegaConf.resolve(cfg)
    return cfg


# Hydra builds a composition from its defaults list (some 100 ms, most of a unit test's time). What that depends on,
# the group choices and the YAML files, is composed once and copied; the key=value overrides are then applied to
# the copy by Hydra's own override code, after the defaults as Hydra applies them
_COMPOSED: OrderedDict[tuple, DictConfig] = OrderedDict()
_COMPOSED_KEPT = 32


def _composed(hydra, overrides: list[str], config_dir: str | None, config_name: str) -> DictConfig:
    """Hydra's composition of `overrides` with its `hydra` node, as `Hydra.compose_config` makes it."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    def by_hydra(lines: list[str]) -> DictConfig:
        return hydra.compose_config(
            config_name=config_name,
            overrides=lines,
            run_mode=RunMode.RUN,
            from_shell=False,
            with_log_configuration=False,
        )

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.is_sweep_override() or o.is_hydra_override() for o in parsed):
        return by_hydra(overrides)
    repo = hydra.config_loader.repository
    is_choice = [repo.group_exists(o.key_or_group) and not isinstance(o.value(), dict) for o in parsed]
    choices = [o.input_line for o, choice in zip(parsed, is_choice) if choice]
    key = (config_name, config_dir and os.path.abspath(config_dir), tuple(choices), _yaml_stamp(config_dir))
    base = _COMPOSED.get(key)
    if base is None:
        base = by_hydra(choices)
        if base.hydra.searchpath:  # more places to find groups in than `repo` knows of
            return by_hydra(overrides)
        _COMPOSED[key] = base
        while len(_COMPOSED) > _COMPOSED_KEPT:
            _COMPOSED.popitem(last=False)
    _COMPOSED.move_to_end(key)
    cfg = copy.deepcopy(base)
    ConfigLoaderImpl._apply_overrides_to_config([o for o, choice in zip(parsed, is_choice) if not choice], cfg)
    job = cfg.hydra.job
    with open_dict(cfg.hydra):
        cfg.hydra.overrides.task = list(overrides)
        cfg.hydra.runtime.cwd = os.getcwd()
        for name in job.env_copy:
            job.env_set[name] = os.environ[name]
        dirname = job.config.override_dirname
        job.override_dirname = get_overrides_dirname(
            overrides=parsed, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys
        )
    return cfg


def _yaml_stamp(config_dir: str | None) -> bytes:
    """A digest of every config file a composition may read, by content: any edit is composed anew."""
    digest = hashlib.blake2b(digest_size=16)
    for root in [Path(__file__).parent, *([Path(config_dir)] if config_dir else [])]:
        for path in sorted(root.rglob("*.yaml")):
            digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


def compose_checked(
    overrides: list[str], check: bool = True, config_dir: str | None = None, config_name: str = "config"
) -> DictConfig:
    """:func:`compose`, with a composition error raised as ConfigError: one line naming the choice or key."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(overrides, check, config_dir, config_name)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(composition_error(e)) from None


def parse_overrides(args: list[str], config_dir: str | None = None) -> list:
    """Hydra's parsed overrides of `args` (a sweep's: `glob()` lists the options of the groups found there)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        with _hydra(config_dir) as hydra:
            return OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(list(args))
    except HydraException as e:
        raise ConfigError(composition_error(e)) from None


def launch_dir() -> str:
    """The absolute run dir of the last composition, as Hydra's run makes it: hydra.run.dir (run.dir unless the
    command line set hydra.run.dir)."""
    from hydra.core.hydra_config import HydraConfig

    return os.path.abspath(str(HydraConfig.get().run.dir))


def sweep_dir() -> str:
    """The absolute sweep dir of the last composition: hydra.sweep.dir (named from the command line's overrides)."""
    from hydra.core.hydra_config import HydraConfig

    return str(Path(str(HydraConfig.get().sweep.dir)).absolute())


def task_overrides() -> list[str]:
    """The last composition's overrides of the config itself (not hydra.*), as the command line wrote them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def hydra_flags(argv: list[str]):
    """`lora-launch`'s command line read by Hydra's own parser: its flags (--config-dir, --cfg, ...), its usage
    errors, and the overrides (`.overrides`). Hydra reads overrides only up to its first flag: flags go first."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def hydra_prints(argv: list[str]) -> None:
    """Hydra's printing flags (--cfg, --info, --hydra-help, --shell-completion) run by Hydra itself, on the same
    conf/, schema and settings as :func:`compose`; Hydra runs no task for them."""
    import sys

    import hydra

    # as a launch: Hydra writes nothing and configures no logging; a bare --info stays last (a topic would follow it)
    quiet = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    info = argv[-1:] if argv[-1:] in (["--info"], ["-i"]) else []
    sys.argv[1:] = [*argv[: len(argv) - len(info)], *quiet, *info]
    register()
    hydra.main(config_path=CONF_PACKAGE, config_name="config", version_base="1.3")(_no_task)()


def _no_task(cfg: DictConfig) -> None:
    """Hydra calls no task for its printing flags."""


def resolve_run(cfg: DictConfig) -> None:
    """Resolve every interpolation once (the run dir's timestamp included), then validate."""
    OmegaConf.resolve(cfg)
    validate(cfg)


def composition_error(e: Exception) -> str:
    """Hydra's and OmegaConf's composition errors (a block of lines ending in the search path) as one line."""
    import re

    from lora_launch.conf.schema import unknown_key

    text = str(e)
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], re.M)
        return f"{group}={option} is not a choice of {group}; choose one of: {', '.join(options)}"
    override = re.search(r"Could not override '([^']+)'", text)
    if override:
        return unknown_key(override.group(1))
    merging = re.search(r"Error merging override (\S+)", text)
    if merging and e.__cause__ is not None:
        return f"{merging.group(1)}: {str(e.__cause__).strip().splitlines()[0]}"
    parsing = re.search(r"Error parsing override '([^']*)'", text)
    if parsing:
        return f"cannot read the override {parsing.group(1)!r}: write key=value (e.g. lora.r=16)"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__
