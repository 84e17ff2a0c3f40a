"""The repository's bench/ folder (benchmarks, not part of the installed package), imported for unit tests."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from support.cli import REPO


def bench_module(name: str) -> ModuleType:
    """bench.`name`, with `bench` itself loaded from its folder: the repository on sys.path would bring back
    its top-level conf/, train/, ... as importable names, hiding a product import that skips lora_launch."""
    if "bench" not in sys.modules:
        folder = REPO / "bench"
        spec = importlib.util.spec_from_file_location(
            "bench", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"bench.{name}")
