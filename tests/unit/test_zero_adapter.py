"""The ZeRO adapter (train/zero.py) against the installed DeepSpeed: the version is in the range the adapter
was written against, and every private DeepSpeed name it relies on is still there, so a DeepSpeed upgrade
that moves them fails here rather than in a resume."""

from __future__ import annotations

import inspect
from importlib import metadata

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from lora_launch.train.state import adapter_for
from lora_launch.train.zero import LOSS_SCALE_FIELDS, SUPPORTED, TorchAdapter


@pytest.fixture(scope="module", autouse=True)
def deepspeed():
    """The module is skipped without DeepSpeed. Imported here rather than at collection (some 1.5 s, MLflow with
    it): only the worker that runs these tests (together, by this fixture's scope) pays for it."""
    return pytest.importorskip("deepspeed")


def _assigned(cls, attribute: str) -> bool:
    """Whether the source of cls sets self.<attribute> (instance attributes are not on the class)."""
    return f"self.{attribute} =" in inspect.getsource(cls)


def test_installed_deepspeed_is_in_the_supported_range():
    installed = Version(metadata.version("deepspeed"))
    assert installed in SpecifierSet(SUPPORTED), (
        f"deepspeed {installed} is outside {SUPPORTED}, the range train/zero.py was written against: check "
        "its private names (this file), run tests/distributed/test_resume.py, then widen SUPPORTED"
    )


def test_the_private_names_the_adapter_uses_exist():
    from deepspeed.runtime.zero import partition_parameters
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import mixed_precision_linkage

    # ZeRO-1/2: the torch optimizer's state is keyed by these partitions; this maps parameters into it
    assert _assigned(DeepSpeedZeroOptimizer, "single_partition_of_fp32_groups")
    assert callable(DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state)
    assert list(inspect.signature(DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state).parameters) == ["self"]
    # ZeRO-3: the state is keyed by these partitions; parameters carry their full shape and an id
    assert _assigned(DeepSpeedZeroOptimizer_Stage3, "fp32_partitioned_groups_flat")
    source = inspect.getsource(partition_parameters)
    assert "param.ds_shape =" in source and "param.ds_id =" in source
    assert "lp_param._hp_mapping =" in inspect.getsource(mixed_precision_linkage)
    # the loss scaler both optimizers hold
    assert _assigned(DeepSpeedZeroOptimizer, "loss_scaler") and _assigned(DeepSpeedZeroOptimizer_Stage3, "loss_scaler")


def test_the_public_functions_the_adapter_uses_keep_their_signatures(deepspeed):
    from deepspeed import utils

    expected = {
        "safe_get_full_fp32_param": ["param"],
        "safe_set_full_fp32_param": ["param", "value"],
        "safe_get_full_optimizer_state": ["param", "optim_state_key"],
        "safe_set_full_optimizer_state": ["param", "value", "optim_state_key"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(utils, name)).parameters)[: len(params)] == params, name
    assert "modifier_rank" in inspect.signature(deepspeed.zero.GatheredParameters).parameters


def test_deepspeeds_loss_scaler_round_trips():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from lora_launch.train.zero import _DeepSpeedLossScaler

    def make():
        return DynamicLossScaler(
            init_scale=2.0**16, scale_window=10, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False
        )

    scaler = make()
    scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis = 512.0, 7, 3, 1
    saved = _DeepSpeedLossScaler(scaler).state_dict()
    assert set(saved) == set(LOSS_SCALE_FIELDS)
    fresh = make()
    _DeepSpeedLossScaler(fresh).load_state_dict(saved)
    assert (fresh.cur_scale, fresh.cur_iter, fresh.last_overflow_iter, fresh.cur_hysteresis) == (512.0, 7, 3, 1)
    assert type(fresh.cur_iter) is int


def test_a_plain_torch_optimizer_gets_the_torch_adapter():
    model = torch.nn.Linear(2, 2)
    adapter = adapter_for(torch.optim.AdamW(model.parameters()))
    assert type(adapter) is TorchAdapter and adapter.loss_scaler() is None
