"""Dependencies run one way: strategies -> conf -> run (the run contract) -> data -> launcher | train -> serve. The
launcher and the training code never import each other; they meet only through lora_launch.run and lora_launch.conf."""

from __future__ import annotations

import ast
import re

from support.cli import REPO

PACKAGES = ("conf", "run", "data", "launcher", "train", "serve", "catalog", "sweep", "studio", "cli")
ALLOWED = {"conf": {"conf"}, "run": {"conf", "run"}, "data": {"conf", "run", "data"},
           "launcher": {"conf", "run", "data", "launcher"}, "train": {"conf", "run", "data", "train"},
           "serve": {"conf", "run", "data", "train", "serve"},  # serving sits above training
           "catalog": {"conf", "run", "catalog"},  # reads run dirs, never trains
           "sweep": {"conf", "run", "launcher", "catalog", "sweep"},  # each trial a launch of its own
           "studio": {"conf", "run", "data", "launcher", "catalog", "studio"},  # runs training and serving as processes
           "cli": set(PACKAGES)}  # the front door sits above everything
# the distributed strategies sit under everything: the schema takes its choices and refusals from them
PACKAGES += ("strategies",)
ALLOWED = {**{package: {*allowed, "strategies"} for package, allowed in ALLOWED.items()}, "strategies": {"strategies"}}
_NAME = re.compile(r"lora_launch\.(\w+)")


def _imports(path) -> set[str]:
    """Packages of lora_launch a module imports, at any depth, or names in a string (importlib targets)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= set(_NAME.findall(node.module))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found |= set(_NAME.findall(alias.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            found |= set(_NAME.findall(node.value.split(":")[0]))  # "lora_launch.x.y:function" dispatch
    return found & set(PACKAGES)


def test_no_package_imports_against_the_layering():
    wrong = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for target in sorted(_imports(path) - ALLOWED[package]):
                wrong.append(f"{path.relative_to(REPO)} imports lora_launch.{target}")
    assert wrong == []


def test_nothing_imports_the_old_top_level_names():
    old = re.compile(r"^\s*(from|import)\s+(conf|data|launcher|train)(\.|\s|$)", re.M)
    hits = [str(p.relative_to(REPO)) for pkg in (*PACKAGES, "tests", "bench", "tools")
            for p in (REPO / pkg).rglob("*.py") if old.search(p.read_text())]
    assert hits == []


def test_nothing_puts_the_repository_on_sys_path():
    """Tests, bench and tools import the product as lora_launch.*: the repository on sys.path would make its
    top-level folders importable again and hide an import that skips the namespace."""
    edit = re.compile(r"\bsys\.path\.(insert|append|extend)\(|\bsys\.path\s*\+?=[^=]|\bsite\.addsitedir\(")
    hits = [str(p.relative_to(REPO)) for pkg in ("tests", "bench", "tools")
            for p in (REPO / pkg).rglob("*.py") if edit.search(p.read_text())]
    assert hits == []
