"""Which paths the studio lets a config name: inside its root (and each --allow-path), where run dirs, caches
and local files must resolve; the installed package's bundled assets (demo data, tiny model) may be read."""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from lora_launch.conf.schema import ConfigError

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Places:
    """The folders the studio was started with."""
    root: Path
    allowed: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.allowed = [Path(p).resolve() for p in self.allowed]

    def resolve(self, value: str) -> Path:
        path = Path(os.path.expanduser(str(value)))
        return (path if path.is_absolute() else self.root / path).resolve()

    def inside(self, path: Path, read_only: bool = False) -> bool:
        bases = [self.root, *self.allowed] + ([_assets()] if read_only else [])
        return any(path == b or path.is_relative_to(b) for b in bases)

    def check(self, key: str, value, read_only: bool = False) -> Path:
        """The path `value` of `key`, resolved; ConfigError when it lies outside the studio's folders."""
        path = self.resolve(value)
        if not self.inside(path, read_only):
            raise ConfigError(f"{key}={value}: outside the folders this studio may use ({self.root}"
                              f"{''.join(', ' + str(p) for p in self.allowed)}); choose a path inside them, or "
                              "restart the studio with --allow-path DIR")
        return path


def _assets() -> Path:
    return Path(str(importlib.resources.files("lora_launch.conf").joinpath("assets"))).resolve()


def _local(value) -> bool:
    """Whether a model/tokenizer value names a local path rather than a hub id."""
    text = str(value)
    return text.startswith(("/", ".", "~")) or not _HUB_ID.match(text) or Path(os.path.expanduser(text)).exists()


def confine(cfg: DictConfig, places: Places) -> None:
    """Every path the composed config names lies inside the studio's folders (bundled assets: read only)."""
    places.check("run.dir", cfg.run.dir)
    d = cfg.data
    if d.cache_dir:
        places.check("data.cache_dir", d.cache_dir)
    entries = [("data", d)] + [(f"data.sources[{i}]", e) for i, e in enumerate(d.get("sources") or [])]
    for where, entry in entries:
        source = entry.get("source", d.source)
        if entry.get("path") and source in ("local", "demo"):
            places.check(f"{where}.path", entry.get("path"), read_only=True)
        if entry.get("cache_dir"):
            places.check(f"{where}.cache_dir", entry.get("cache_dir"))
    for key in ("path", "tokenizer"):
        value = cfg.model.get(key)
        if value and _local(value):
            places.check(f"model.{key}", value, read_only=True)
    for key, value in (("launcher.hostfile", cfg.launcher.hostfile),
                       ("launcher.accelerate_config", cfg.launcher.accelerate_config),
                       ("distributed.deepspeed_config", cfg.distributed.deepspeed_config)):
        if value:
            places.check(key, value, read_only=True)
    if cfg.resume.mode not in ("auto", "never"):
        places.check("resume.mode", cfg.resume.mode)
