"""The distributed strategies come from one registry (lora_launch.strategies): each is a module plus the YAML
options in conf/distributed/ that choose it, and nothing outside those modules compares strategy names or ZeRO
stages."""

from __future__ import annotations

import ast
import json
import os

import pytest
import yaml

from lora_launch import strategies
from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError, describe
from lora_launch.launcher.checks import check_strategy
from lora_launch.launcher.launch import write_launch_files
from lora_launch.launcher.topology import run_plan, topology
from lora_launch.strategies.base import Strategy
from support.cli import REPO

OPTIONS = sorted(p.stem for p in (REPO / "conf" / "distributed").glob("*.yaml"))


def _strategy_of(option: str) -> str:
    """The strategy the option's file names, else the schema's default (ddp: conf/distributed/ddp.yaml sets none)."""
    own = yaml.safe_load((REPO / "conf" / "distributed" / f"{option}.yaml").read_text())
    return own.get("strategy", describe("distributed.strategy").default)


def test_the_registry_lists_each_strategy_module_and_the_schema_offers_them():
    assert strategies.names() == ["ddp", "deepspeed", "fsdp2"]
    assert all(isinstance(strategies.strategy_named(name), Strategy) for name in strategies.names())
    assert describe("distributed.strategy").type == "|".join(strategies.names())
    # every YAML option chooses a registered strategy, and every strategy has an option
    assert {_strategy_of(option) for option in OPTIONS} == set(strategies.names())


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_composes_validates_and_writes_its_launch_files(tmp_path, option):
    cfg = compose([f"distributed={option}", "launcher.num_processes=2", f"run.dir={tmp_path}"])
    strategy = strategies.strategy_for(cfg)
    assert strategy.name == _strategy_of(option) and strategy.problems(cfg) == []
    topo = topology(cfg)
    plan = run_plan(cfg, topo)
    check_strategy(cfg, plan)
    files = write_launch_files(cfg, tmp_path, topo, plan)
    accelerate = yaml.safe_load(files["accelerate"].read_text())
    assert accelerate["num_processes"] == 2
    ds = strategy.deepspeed_config(cfg, plan)
    assert ("deepspeed" in files) is (ds is not None)
    if ds is not None:  # accelerate reads the DeepSpeed JSON, which owns the precision
        assert accelerate["deepspeed_config"]["deepspeed_config_file"] == str(files["deepspeed"])
        assert "mixed_precision" not in accelerate
    for key, (name, content) in strategy.shown_files(cfg, plan).items():
        assert files[key] == tmp_path / name and json.loads(files[key].read_text()) == content
    assert strategy.label(plan) in strategy.describe(cfg, plan)


@pytest.mark.parametrize(
    "overrides,refused",
    [
        (["distributed.zero_stage=3"], "distributed.zero_stage=3 with distributed=ddp: ZeRO stages are DeepSpeed's"),
        (
            ["distributed=zero2", "distributed.zero_stage=1"],
            "distributed.zero_stage=1: DeepSpeed here runs ZeRO stage 2",
        ),
        (
            ["distributed=zero3", "distributed.keep_gathered=2"],
            "distributed.keep_gathered=2 with distributed=zero3: only",
        ),
        (["distributed=fsdp2", "optim.name=paged_adamw_32bit"], "optim.name=paged_adamw_32bit with distributed=fsdp2:"),
    ],
)
def test_a_strategy_refuses_what_it_cannot_run_when_the_config_is_composed(overrides, refused):
    with pytest.raises(ConfigError, match="^" + refused.replace("(", r"\(")):
        compose(overrides)


# the words that name a strategy in code: the registry's names and the YAML options that choose them
_WORDS = {*strategies.names(), *OPTIONS}


def _compares_a_strategy(node: ast.Compare) -> bool:
    """Whether a comparison reads a strategy or ZeRO stage field (`cfg.distributed.strategy`, `plan.zero_stage`)
    or holds a variable `strategy` against a strategy's name."""
    sides = [node.left, *node.comparators]
    attributes = {s.attr for s in sides if isinstance(s, ast.Attribute)}
    names = {s.id for s in sides if isinstance(s, ast.Name)}
    words = {
        e.value
        for s in sides
        for e in (s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [s])
        if isinstance(e, ast.Constant)
    }
    return bool(
        {"strategy", "zero_stage"} & attributes or "zero_stage" in names or ("strategy" in names and words & _WORDS)
    )


def test_nothing_outside_the_strategies_compares_a_strategy_name_or_zero_stage():
    found = []
    for package in ("conf", "run", "data", "launcher", "train", "serve", "studio", "cli"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and _compares_a_strategy(node):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_the_scan_finds_the_comparisons_it_forbids():
    caught = [
        'cfg.distributed.strategy == "fsdp2"',
        "d.zero_stage == 3",
        "plan.zero_stage != 3",
        'strategy in ("deepspeed", "ddp")',
        'plan.strategy != "ddp"',
    ]
    passed = ['strategy == "next_fit"', '"deepspeed" in sys.modules', "d.keep_gathered == 0"]
    compare = lambda text: _compares_a_strategy(ast.parse(text, mode="eval").body)  # noqa: E731
    assert [compare(t) for t in caught] == [True] * len(caught)
    assert [compare(t) for t in passed] == [False] * len(passed)


@pytest.mark.parametrize("deepcompile", [True, False])
def test_a_deepspeed_engine_with_deepcompile_on_is_compiled_once_prepared(deepcompile, monkeypatch):
    """compile.deepcompile in a user's DeepSpeed JSON does nothing until the engine's compile() runs (DeepSpeed
    logs that and trains without it): `prepare` runs it once, its CUDA op built for this GPU's architecture
    unless the user named some; an engine without it is left as it is."""
    import torch

    from lora_launch.train.distributed import prepare

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    class Engine:  # what accelerate's prepare returns under DeepSpeed: the engine, with DeepSpeed's two calls
        compiled = 0

        def is_deepcompile_enabled(self):
            return deepcompile

        def compile(self):
            self.compiled += 1

    class Accelerator:
        def prepare(self, model, optimizer):
            return Engine(), optimizer

    engine, optimizer = prepare(Accelerator(), compose(["distributed=zero3"]), object(), "optimizer")
    assert engine.compiled == int(deepcompile) and optimizer == "optimizer"
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == ("9.0" if deepcompile else None)
    for listed, built in [
        ("8.0;9.0", "8.0;9.0"),
        ("8.0 9.0", "8.0 9.0"),
        ("9.0a", "9.0"),
        ("8.0 9.0a+PTX 10.0f", "8.0;9.0+PTX;10.0"),
    ]:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", listed)  # the user's own list is kept, less what DeepSpeed misreads
        prepare(Accelerator(), compose(["distributed=zero3"]), object(), "optimizer")
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == (built if deepcompile else listed)
