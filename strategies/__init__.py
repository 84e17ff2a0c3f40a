"""The distributed strategies, one module each (ddp, zero, fsdp2), found by this registry: every module here
that defines `STRATEGY` (a `base.Strategy`) is one, keyed by its name, the `distributed.strategy` value that
conf/distributed/*.yaml choose. docs/strategies.md says how to add one."""

from __future__ import annotations

import importlib
import pkgutil

from lora_launch.strategies.base import Strategy

__all__ = ["Strategy", "names", "strategy_for", "strategy_named"]


def _discover() -> dict[str, Strategy]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        strategy = getattr(importlib.import_module(f"{__name__}.{module.name}"), "STRATEGY", None)
        if isinstance(strategy, Strategy):
            found[strategy.name] = strategy
    return dict(sorted(found.items()))


REGISTRY = _discover()


def names() -> list[str]:
    """The strategies' names: the choices of distributed.strategy."""
    return list(REGISTRY)


def strategy_named(name) -> Strategy:
    """The strategy whose name is `name` (a distributed.strategy value, or its Enum member)."""
    return REGISTRY[str(getattr(name, "value", name))]


def strategy_for(cfg) -> Strategy:
    """The strategy a composed config runs under (its distributed.strategy)."""
    return strategy_named(cfg.distributed.strategy)
