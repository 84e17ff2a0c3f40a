"""The run plan: one computation of the launch's derived values, checked against hand-computed cases."""

from __future__ import annotations

import pytest

from lora_launch.conf.compose import compose
from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for


def test_global_batch_and_steps_by_hand():
    cfg = compose(["train.micro_batch_size=4", "train.grad_accum=8", "train.epochs=1"])
    plan = RunPlan.from_config(cfg, 2, 8, on_gpu=False)
    assert plan.world_size == 16 and plan.global_batch == 512
    cfg = compose(["train.micro_batch_size=4", "train.grad_accum=2", "train.epochs=1"])
    plan = RunPlan.from_config(cfg, 1, 2, on_gpu=False)
    assert plan.steps_per_epoch(9846) == 616 and plan.total_steps(9846) == 616  # ceil(9846 / 16)
    cfg = compose(["train.micro_batch_size=4", "train.grad_accum=2", "train.epochs=2.5"])
    assert RunPlan.from_config(cfg, 1, 2, on_gpu=False).total_steps(9846) == 1539  # ceil(2.5 * 9846 / 16)
    cfg = compose(["train.micro_batch_size=4", "train.grad_accum=2", "train.max_steps=100"])
    assert RunPlan.from_config(cfg, 1, 2, on_gpu=False).total_steps(9846) == 100
    cfg = compose(["train.micro_batch_size=4", "train.grad_accum=2", "train.epochs=3"])
    assert RunPlan.from_config(cfg, 1, 2, on_gpu=False).total_steps(100) == 19  # ceil(3 * 100 / 16)


@pytest.mark.parametrize(
    "on_gpu,bf16,want", [(False, False, "float32"), (True, True, "bfloat16"), (True, False, "float32")]
)
def test_auto_precision_follows_the_hardware(on_gpu, bf16, want):
    cfg = compose(["model=llama2_7b_random"])
    plan = RunPlan.from_config(cfg, 1, 1, on_gpu=on_gpu, bf16=bf16)
    assert plan.precision == want and plan.model_dtype == want
    assert plan.mixed_precision == {"float32": "no", "bfloat16": "bf16"}[want]


def test_compile_mode_auto_is_layers_on_gpus_loss_under_zero3_none_on_cpu():
    assert RunPlan.from_config(compose([]), 1, 1, on_gpu=False).compile == "none"
    assert RunPlan.from_config(compose([]), 1, 1, on_gpu=True, bf16=True).compile == "layers"
    z3 = compose(["distributed=zero3"])
    assert RunPlan.from_config(z3, 1, 2, on_gpu=True, bf16=True).compile == "loss"
    assert RunPlan.from_config(compose(["train.compile=none"]), 1, 1, on_gpu=True, bf16=True).compile == "none"


def test_deepspeed_json_precision_comes_from_the_plan():
    cfg = compose(["distributed=zero2", "model=llama2_7b_random"])
    on_gpu = strategy_for(cfg).deepspeed_config(cfg, RunPlan.from_config(cfg, 1, 2, on_gpu=True, bf16=True))
    on_cpu = strategy_for(cfg).deepspeed_config(cfg, RunPlan.from_config(cfg, 1, 2, on_gpu=False))
    assert on_gpu["bf16"]["enabled"] and not on_cpu["bf16"]["enabled"]
    assert on_gpu["train_batch_size"] == on_cpu["train_batch_size"] == 4 * 1 * 2
