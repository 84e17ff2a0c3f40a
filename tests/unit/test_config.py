"""Tier 1: compose the real configs from conf/ and check the schema's rejections."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_launch.conf.schema import ConfigError
from lora_launch.conf.compose import compose
from support.cli import REPO, lora_launch

GROUPS = ["model", "data", "lora", "quant", "optim", "distributed", "launcher", "logging", "preset"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose([f"{group}={option}", f"run.dir={tmp_path}"])
    if group in ("model", "data", "distributed", "launcher"):
        assert cfg[group].name == option
    assert cfg.run.dir == str(tmp_path)
    # fully resolved: no interpolation survives into what ranks read
    assert "${" not in OmegaConf.to_yaml(cfg)


def test_defaults_are_the_embedded_job():
    cfg = compose([])
    assert cfg.model.name == "tiny" and Path(cfg.model.path).is_dir()
    assert cfg.data.source == "demo" and Path(cfg.data.path).is_file()
    assert cfg.distributed.strategy == "ddp" and cfg.quant.mode == "none"
    assert cfg.run.dir.startswith("runs/")


def test_contract_keys_exist():
    cfg = compose([])
    for key in ["lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "optim.lr", "train.max_steps",
                "train.epochs", "train.micro_batch_size", "train.grad_accum", "train.seq_len", "train.grad_ckpt",
                "eval.every_steps", "checkpoint.every_steps", "checkpoint.keep_last", "launcher.num_processes",
                "run.dir", "seed"]:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key == "train.max_steps", key


@pytest.mark.parametrize("override,key", [
    ("lora.r=0", "lora.r"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("optim.scheduler=step", "optim.scheduler"),
    ("launcher.num_processes=0", "launcher.num_processes"),
    ("launcher.num_processes=many", "launcher.num_processes"),
    ("lora.target_modules=[]", "lora.target_modules"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([override])


@pytest.mark.parametrize("override,key", [("lora.rank=8", "lora.rank"), ("lora.r=abc", "lora.r"),
                                          ("train.grad_ckpt=maybe", "train.grad_ckpt"), ("bogus=1", "bogus")])
def test_unknown_keys_and_wrong_types_fail_at_compose(override, key):
    with pytest.raises(Exception, match=key.split(".")[-1]):
        compose([override])


