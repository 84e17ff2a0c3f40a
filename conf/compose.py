"""Compose the Hydra config outside `@hydra.main` (tests, direct `accelerate launch`), and resolve it once."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lora_launch.conf.schema import plain, register, validate

__all__ = ["compose", "plain", "resolve_run"]  # plain: schema's, still importable from here


def compose(overrides: list[str]) -> DictConfig:
    """The config that `lora-launch <overrides>` would use, without Hydra's output dirs or chdir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals

    register()
    setup_globals()  # the `now` resolver
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lora_launch.conf", version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    resolve_run(cfg)
    return cfg


def resolve_run(cfg: DictConfig) -> None:
    """Resolve every interpolation once (the run dir's timestamp included), then validate."""
    OmegaConf.resolve(cfg)
    validate(cfg)
