"""Tier 1: compose the real configs from conf/ and check the schema's rejections."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import Choice, ConfigError, plain, resume_free_keys
from support.cli import REPO

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
    for key in [
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "lora.target_modules",
        "optim.lr",
        "train.max_steps",
        "train.epochs",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.seq_len",
        "train.grad_ckpt",
        "eval.every_steps",
        "checkpoint.every_steps",
        "checkpoint.keep_last",
        "launcher.num_processes",
        "run.dir",
        "seed",
    ]:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key == "train.max_steps", key


@pytest.mark.parametrize(
    "override,key",
    [
        ("lora.r=0", "lora.r"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("launcher.num_processes=0", "launcher.num_processes"),
        ("launcher.num_processes=many", "launcher.num_processes"),
        ("lora.target_modules=[]", "lora.target_modules"),
    ],
)
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("lora.rank=8", "lora.rank"),
        ("lora.r=abc", "lora.r"),
        ("train.grad_ckpt=maybe", "train.grad_ckpt"),
        ("bogus=1", "bogus"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_compose(override, key):
    with pytest.raises(Exception, match=key.split(".")[-1]):
        compose([override])


# ---- choices are types; the schema types every group option ------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "distributed.strategy=foo",
        "quant.mode=nf5",
        "train.compile=fast",
        "train.precision=bf16",
        "model.dtype=fp32",
        "data.format=csv",
        "optim.scheduler=step",
    ],
)
def test_a_bad_choice_fails_at_compose_naming_the_key(override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigCompositionException) as failed:
        compose([override])
    assert re.search(rf"(?s)Invalid value '{value}'.*full_key: {re.escape(key)}", str(failed.value.__cause__))


def test_choices_read_as_plain_strings(tmp_path):
    cfg = compose(["quant=nf4", "train.precision=bfloat16", f"run.dir={tmp_path}"])
    mode, precision = cfg.quant.mode, cfg.train.precision
    assert isinstance(mode, Enum) and mode == "nf4" and precision == "bfloat16"
    assert f"{mode}" == str(mode) == "nf4" and f"{precision:>9}" == " bfloat16"
    assert {"nf4": 1}[mode] == 1 and mode in ("none", "nf4")
    data = plain(cfg)
    assert type(data["quant"]["mode"]) is str and type(data["train"]["precision"]) is str
    assert yaml.safe_load(yaml.safe_dump(data))["quant"]["mode"] == "nf4"


def test_every_choice_is_named_by_its_value():
    # OmegaConf reads an Enum field by member name: the name must be the word users write
    for choice in Choice.__subclasses__():
        assert [m.name for m in choice] == [m.value for m in choice], choice


@pytest.mark.parametrize("group", ["model", "data", "lora", "quant", "optim", "distributed", "launcher", "logging"])
def test_no_group_offers_its_schema_as_an_option(group):
    with pytest.raises(MissingConfigException, match=f"{group}/{group}_schema"):
        compose([f"{group}={group}_schema"])


@pytest.mark.parametrize(
    "content,error",
    [
        ("r: abc\n", "converted to Integer"),
        ("rank: 8\n", "Key 'rank' not in"),
        ("bias: some\n", "Invalid value 'some'"),
    ],
)
def test_a_group_option_file_is_checked_against_the_schema(tmp_path, content, error):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "mine.yaml").write_text(content)
    with pytest.raises(Exception, match=error):
        compose([f"hydra.searchpath=[file://{tmp_path}]", "lora=mine"])


def test_keys_free_to_change_on_resume_are_marked_on_the_schema():
    assert set(resume_free_keys()) == {
        "run",
        "logging",
        "eval",
        "checkpoint",
        "resume",
        "sample",
        "launcher",
        "distributed",
        "sweep",
        "preview",
        "train.threads",
        "train.num_workers",
        "train.compile",
        "train.deterministic",
        "train.fused_projections",
    }
    assert len(resume_free_keys()) == len(set(resume_free_keys()))
