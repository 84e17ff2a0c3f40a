"""One source for defaults, one path for composing: the schema holds every default (conf/config.yaml holds only its
defaults list, a choice's YAML only what it changes) and conf/compose.py is the only module that runs Hydra's
composition."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml
from omegaconf import OmegaConf

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import Config, plain
from support.cli import REPO

CONF = REPO / "conf"
# the modules Hydra composes or starts through; only conf/compose.py may call them
HYDRA_ENTRIES = {
    "hydra": {"main", "compose", "initialize", "initialize_config_dir", "initialize_config_module"},
    "hydra.core.global_hydra": {"GlobalHydra"},
    "hydra._internal.hydra": {"Hydra"},
}


def _product_modules() -> list[Path]:
    packages = [p for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "tests"]
    return sorted(f for p in packages for f in p.rglob("*.py"))


def _hydra_entries(path: Path) -> list[str]:
    """`module.name` of each Hydra composition entry the file imports or calls (`hydra.main(...)` included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in HYDRA_ENTRIES:
            found += [f"{node.module}.{a.name}" for a in node.names if a.name in HYDRA_ENTRIES[node.module]]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "hydra"
            and node.attr in HYDRA_ENTRIES["hydra"]
        ):
            found.append(f"hydra.{node.attr}")
    return found


def test_only_conf_compose_runs_hydras_composition():
    modules = _product_modules()
    assert REPO / "cli" / "train.py" in modules and REPO / "sweep" / "space.py" in modules
    outside = {str(p.relative_to(REPO)): _hydra_entries(p) for p in modules if p != CONF / "compose.py"}
    assert {k: v for k, v in outside.items() if v} == {}
    assert _hydra_entries(CONF / "compose.py")  # the scan sees the one place that does


def test_config_yaml_holds_only_its_defaults_list():
    primary = yaml.safe_load((CONF / "config.yaml").read_text())
    assert list(primary) == ["defaults"] and primary["defaults"][0] == "schema"


def _schema_defaults() -> dict:
    """The schema's defaults as plain data, a section a choice fills (model, data, ...) with its own dataclass's
    defaults; interpolations as written; a key only a choice sets (`name`): `???`."""
    root = OmegaConf.structured(Config)
    hints = get_type_hints(Config)
    for f in fields(Config):
        if OmegaConf.is_missing(root, f.name):
            root[f.name] = OmegaConf.structured(hints[f.name])
    return OmegaConf.to_container(root, enum_to_str=True)


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _set_by_yaml(group: str, option: str) -> dict:
    """The leaves a group option's YAML sets, by dotted key of the whole config (`@package _global_` files at the
    top); its defaults list left out."""
    path = CONF / group / f"{option}.yaml"
    if not path.exists():  # `optional model_recipe: ${model}`: a model without a recipe
        return {}
    text = path.read_text()
    tree = {k: v for k, v in (yaml.safe_load(text) or {}).items() if k != "defaults"}
    return _leaves(tree, "" if "@package _global_" in text else f"{group}.")


OPTIONS = [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml"))]


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] not in ("preset", "model_recipe")])
def test_a_choice_sets_only_what_it_changes(group, option):
    """No key of a choice's YAML repeats the schema's default. (A preset is a recipe and states its values: they
    override the model_recipe and the choices it is combined with.)"""
    schema = _leaves(_schema_defaults())
    same = {k: v for k, v in _set_by_yaml(group, option).items() if k in schema and schema[k] == v}
    assert same == {}, f"conf/{group}/{option}.yaml repeats the schema's defaults"


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] != "model_recipe"])
def test_what_no_yaml_sets_is_the_schemas_default(group, option):
    from hydra.core.hydra_config import HydraConfig

    cfg = _leaves(plain(compose([f"{group}={option}"], check=False)))
    choices = {g: o for g, o in HydraConfig.get().runtime.choices.items() if o and not g.startswith("hydra")}
    assert choices[group] == option and choices["model"] == (
        "llama2_7b" if option == "llama2_guanaco" else choices["model"]
    )
    set_by_yaml = {k for g, o in choices.items() for k in _set_by_yaml(g, o)}
    schema = _leaves(_schema_defaults())
    # run.dir: the schema's timestamp, resolved; `???`: a section only a choice fills (model, data, ...)
    unset = {
        k
        for k, v in schema.items()
        if v != "???" and k != "run.dir" and not any(s == k or s.startswith(k + ".") for s in set_by_yaml)
    }
    assert len(unset) > 100  # most keys are set by no YAML
    assert {k: (cfg[k], schema[k]) for k in unset if cfg[k] != schema[k]} == {}
    assert cfg["run.dir"].startswith("runs/") and schema["run.dir"] == "runs/${now:%Y-%m-%d_%H-%M-%S}"
