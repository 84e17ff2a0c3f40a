"""Which paths the studio lets a config name: inside its root (and each --allow-path), where run dirs, caches
and local files must resolve; the installed package's bundled assets (demo data, tiny model) may be read.
The schema marks which keys name paths; nothing here lists them."""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from omegaconf import DictConfig, OmegaConf

from lora_launch.conf.schema import ConfigError, dotted, path_keys


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

    def check(self, key: str, value, read_only: bool = False, local: str | None = None) -> Path:
        """The path `value` of `key` (`local`: the path a URI value names), resolved; ConfigError when it lies
        outside the studio's folders."""
        path = self.resolve(value if local is None else local)
        if not self.inside(path, read_only):
            raise ConfigError(
                f"{key}={value}: outside the folders this studio may use ({self.root}"
                f"{''.join(', ' + str(p) for p in self.allowed)}); choose a path inside them, or "
                "restart the studio with --allow-path DIR"
            )
        return path


def _assets() -> Path:
    return Path(str(importlib.resources.files("lora_launch.conf").joinpath("assets"))).resolve()


def local_path(uri: str) -> str | None:
    """The local file a tracking URI names (a plain path, file:..., sqlite:///...), or None for a server's URI."""
    scheme = re.match(r"^([A-Za-z][\w+.-]*):", uri)
    if scheme is None or len(scheme.group(1)) == 1:  # no scheme, or a Windows drive letter
        return uri
    name = scheme.group(1).lower()
    if name == "file":
        return unquote(urlparse(uri).path)
    if name.startswith("sqlite"):  # sqlite:///relative.db, sqlite:////absolute.db (SQLAlchemy's URLs)
        return uri.partition("://")[2].split("?", 1)[0][1:] or None
    return None


def _values(tree, key: str):
    """(dotted key, value) at `key` of a plain config tree; `[*]` stands for each entry of a list."""
    head, star, rest = key.partition("[*].")
    if not star:
        yield key, dotted(tree, key)
        return
    for i, entry in enumerate(dotted(tree, head) or []):
        yield f"{head}[{i}].{rest}", dotted(entry, rest) if isinstance(entry, dict) else None


def confine(cfg: DictConfig, places: Places) -> None:
    """Every value of a path field (conf/schema.py's `pathlike`: files, directories, hub names, tracking URIs), in
    data.sources entries too, lies inside the studio's folders (bundled assets: read only). A relative value
    resolves under the root, as the jobs the studio starts run there: a hub id such as OWNER/NAME passes."""
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for pattern, meta in path_keys().items():
        for key, value in _values(tree, pattern):
            local = None if value is None else local_path(str(value)) if meta["uri"] else str(value)
            if local:
                places.check(key, value, read_only=meta["path"] == "reads", local=local)
