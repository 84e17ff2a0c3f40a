"""The installed conf directory as a user chooses from it: each config group with its options, and the choices
conf/config.yaml's defaults list makes (what `lora-launch --help` lists and the studio's form offers)."""

from __future__ import annotations

import importlib.resources

import yaml


def _conf_dir():
    return importlib.resources.files("lora_launch.conf")


def config_groups() -> dict[str, list[str]]:
    """Each config group of the installed conf directory, with its options."""
    groups = {}
    for entry in sorted(_conf_dir().iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            options = sorted(p.name.removesuffix(".yaml") for p in entry.iterdir() if p.name.endswith(".yaml"))
            if options:
                groups[entry.name] = options
    return groups


def primary_config() -> dict:
    """conf/config.yaml as written: its defaults list (every key's default is the schema's)."""
    return yaml.safe_load(_conf_dir().joinpath("config.yaml").read_text()) or {}


def default_choices(primary: dict) -> dict[str, str]:
    """The option config.yaml's defaults list picks for each group (`model: tiny`)."""
    return {k: str(v) for entry in primary.get("defaults", []) if isinstance(entry, dict) for k, v in entry.items()}
