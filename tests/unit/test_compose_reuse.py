"""conf/compose.py composes a set of group choices once and applies the key=value overrides to a copy: each
composition must be the one Hydra makes of the whole command line, `hydra` node included, errors included, and a
config file edited between two compositions must be read again."""

from __future__ import annotations

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from lora_launch.conf import compose as composing

COMMAND_LINES = [
    [],
    ["lora.r=8"],
    ["lora.r=8", "lora.r=16"],  # the last one wins
    ["model=llama2_7b_random", "lora.r=64", "run.dir=/tmp/unused"],
    ["lora.r=64", "model=llama2_7b_random"],  # a choice after a value
    ["distributed=fsdp2", "distributed.replicate=1", "launcher.num_processes=2"],
    ["preset=llama2_guanaco", "optim.lr=3e-4"],
    ["quant=nf4", "train.grad_ckpt=auto"],
    ["model=llama2_7b_random", "quant=nf4", "distributed=zero3", "lora.r=2"],
    ["data.source=local", "data.path=d.jsonl", "data.sources=[{path: a.jsonl, weight: 2}]"],
    ["lora.target_modules=[q_proj,k_proj]", "++seed=3"],
    ["hydra.run.dir=/tmp/elsewhere", "lora.r=4"],  # Hydra's own node: composed whole
    # what Hydra refuses, refused alike
    ["lora.r=abc"],
    ["lora.nosuch=1"],
    ["model=nosuch"],
    ["lora.r=8,16"],
    ["lora.r"],
    ["+model=tiny"],
]


def _hydras_own(overrides: list[str], config_dir: str | None = None):
    """Hydra's composition of the whole command line as Hydra.compose_config makes it, the config resolved as
    compose() resolves it and the `hydra` node as it is; or the error Hydra raises."""
    try:
        with composing._hydra(config_dir) as hydra:
            cfg = hydra.compose_config(
                config_name="config",
                overrides=overrides,
                run_mode=RunMode.RUN,
                from_shell=False,
                with_log_configuration=False,
            )
    except Exception as e:  # noqa: BLE001 - the error is what is compared
        return type(e), str(e)
    own = OmegaConf.to_container(cfg.hydra)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return {**OmegaConf.to_container(cfg, resolve=True), "hydra": own}


def _reused(overrides: list[str], config_dir: str | None = None):
    """compose()'s composition of the command line with its `hydra` node, or the error it raises."""
    try:
        cfg = composing.compose(overrides, check=False, config_dir=config_dir)
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return {**OmegaConf.to_container(cfg), "hydra": OmegaConf.to_container(HydraConfig.get())}


@pytest.mark.parametrize("overrides", COMMAND_LINES, ids=lambda o: " ".join(o) or "defaults")
def test_each_composition_is_hydras_own_of_the_whole_command_line(overrides):
    overrides = [*overrides, "run.dir=/tmp/unused"]  # not named by the clock, which may tick between the two
    composing._COMPOSED.clear()
    first = _reused(overrides)
    _reused(["seed=11", *[o for o in overrides if "." not in o.split("=")[0]]])
    again = _reused(overrides)  # from the kept composition of its choices, after another command line used it
    expected = _hydras_own(overrides)
    assert first == expected and again == expected


def test_a_config_file_edited_between_compositions_is_read_again(tmp_path):
    mine = tmp_path / "model" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("defaults:\n  - tiny\n  - _self_\nrevision: r128\n")
    assert composing.compose(["model=mine"], check=False, config_dir=str(tmp_path)).model.revision == "r128"
    mine.write_text("defaults:\n  - tiny\n  - _self_\nrevision: r256\n")  # same size, maybe the same mtime
    assert composing.compose(["model=mine"], check=False, config_dir=str(tmp_path)).model.revision == "r256"
    overrides = ["model=mine", "lora.r=2", "run.dir=/tmp/unused"]
    assert _reused(overrides, str(tmp_path)) == _hydras_own(overrides, str(tmp_path))
