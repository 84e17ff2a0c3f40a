"""Dependencies run one way: strategies -> conf -> run (the run contract) -> data -> launcher | train -> serve;
catalog (the runs on disk) reads run dirs only; sweep runs its trials as launches; the studio runs training and
serving as processes; cli, the front door, sits above them all. The launcher and the training code never import
each other; they meet only through lora_launch.run and lora_launch.conf. No module reaches into another package's
private names, and no modules import each other in a circle, not even through an import inside a function."""

from __future__ import annotations

import ast
import re

from support.cli import REPO

PACKAGES = ("conf", "run", "data", "launcher", "train", "serve", "catalog", "sweep", "studio", "cli")
ALLOWED = {
    "conf": {"conf"},
    "run": {"conf", "run"},
    "data": {"conf", "run", "data"},
    "launcher": {"conf", "run", "data", "launcher"},
    "train": {"conf", "run", "data", "train"},
    "serve": {"conf", "run", "data", "train", "serve"},  # serving sits above training
    "catalog": {"conf", "run", "catalog"},  # reads run dirs, never trains
    "sweep": {"conf", "run", "launcher", "catalog", "sweep"},  # each trial a launch of its own
    "studio": {"conf", "run", "data", "catalog", "studio"},  # runs training and serving as processes
    "cli": set(PACKAGES),
}  # the front door sits above everything
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


def _modules() -> dict[str, ast.Module]:
    """Every module of the product by its dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = [package, *path.relative_to(REPO / package).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(["lora_launch", *parts])] = ast.parse(path.read_text())
    return modules


def _imported(tree: ast.Module, modules) -> list[tuple[str, str]]:
    """(module, name) for each name a module imports from the product, at any depth (name "" for a whole
    module); `from package import module` counts as importing that module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, "") if submodule in modules else (node.module, alias.name))
    return found


def _package(module: str) -> str:
    return module.split(".")[1]


def test_no_module_imports_another_packages_private_names():
    modules = _modules()
    wrong = [
        f"{module} imports {target}.{name}"
        for module, tree in modules.items()
        for target, name in _imported(tree, modules)
        if name.startswith("_") and not name.startswith("__") and _package(target) != _package(module)
    ]
    assert wrong == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, and modules that import themselves (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other_in_a_circle():
    """Counting imports inside functions too: a circle there still makes two modules one."""
    modules = _modules()
    graph = {module: {target for target, _ in _imported(tree, modules)} for module, tree in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e"]]


def test_nothing_imports_the_old_top_level_names():
    old = re.compile(r"^\s*(from|import)\s+(conf|data|launcher|train)(\.|\s|$)", re.M)
    hits = [
        str(p.relative_to(REPO))
        for pkg in (*PACKAGES, "tests", "bench", "tools")
        for p in (REPO / pkg).rglob("*.py")
        if old.search(p.read_text())
    ]
    assert hits == []


def test_nothing_puts_the_repository_on_sys_path():
    """Tests, bench and tools import the product as lora_launch.*: the repository on sys.path would make its
    top-level folders importable again and hide an import that skips the namespace."""
    edit = re.compile(r"\bsys\.path\.(insert|append|extend)\(|\bsys\.path\s*\+?=[^=]|\bsite\.addsitedir\(")
    hits = [
        str(p.relative_to(REPO))
        for pkg in ("tests", "bench", "tools")
        for p in (REPO / pkg).rglob("*.py")
        if edit.search(p.read_text())
    ]
    assert hits == []
