"""Compose the Hydra config outside `@hydra.main` (tests, direct `accelerate launch`), and resolve it once."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lora_launch.conf.schema import plain, register, validate

__all__ = ["compose", "plain", "resolve_run"]  # plain: schema's, still importable from here


def compose(overrides: list[str], check: bool = True) -> DictConfig:
    """The config that `lora-launch <overrides>` would use, without Hydra's output dirs or chdir
    (check=False: resolved, not validated: the launcher reads its run dir before the launch validates)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals

    register()
    setup_globals()  # the `now` resolver
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lora_launch.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    if check:
        resolve_run(cfg)
    else:
        OmegaConf.resolve(cfg)
    return cfg


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
