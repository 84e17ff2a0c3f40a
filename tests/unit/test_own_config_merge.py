"""A user's own accelerate config and DeepSpeed JSON: kept where the run has no say, refused in one line
where they disagree with what the run sets."""

from __future__ import annotations

import json

import pytest
import yaml

from lora_launch.conf.compose import compose
from lora_launch.conf.schema import ConfigError
from lora_launch.launcher.accelerate_config import accelerate_config
from lora_launch.run.own_configs import merged_accelerate, merged_deepspeed
from lora_launch.strategies import strategy_for


@pytest.fixture
def plan_of():
    from lora_launch.launcher.topology import run_plan, topology

    def make(*overrides):
        cfg = compose(["distributed=zero2", "launcher.num_processes=2", *overrides])
        return cfg, run_plan(cfg, topology(cfg))

    return make


def test_deepspeed_json_keeps_the_users_settings_and_fills_auto(plan_of, tmp_path):
    cfg, plan = plan_of()
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000000, "allgather_partitions": True},
        "communication_data_type": "fp32",
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ours = strategy_for(cfg).deepspeed_config(cfg, plan)
    merged = merged_deepspeed(ours, str(path))
    assert merged["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size  # auto: the run's value
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000000  # the user's, over the default
    assert merged["zero_optimization"]["allgather_partitions"] is True and merged["communication_data_type"] == "fp32"
    assert merged["train_batch_size"] == plan.global_batch and merged["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "user, message",
    [
        (
            {"zero_optimization": {"stage": 3}},
            "zero_optimization.stage is 3 but this run has 2 (from distributed.zero_stage)",
        ),
        ({"train_micro_batch_size_per_gpu": 64}, "train_micro_batch_size_per_gpu is 64 but this run has"),
        ({"optimizer": {"type": "AdamW"}}, "remove its 'optimizer' section"),
        ([1, 2], "expected a mapping of settings, got list"),
    ],
)
def test_deepspeed_json_conflicts_are_one_line(plan_of, tmp_path, user, message):
    cfg, plan = plan_of()
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(
        ConfigError, match="distributed.deepspeed_config=.*ds.json: " + message.replace("(", r"\(").replace(")", r"\)")
    ):
        merged_deepspeed(strategy_for(cfg).deepspeed_config(cfg, plan), str(path))


def test_accelerate_config_keeps_the_users_settings(plan_of, tmp_path):
    cfg, plan = plan_of("distributed=ddp")
    path = tmp_path / "acc.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "num_processes": 2,
                "dynamo_config": {"dynamo_backend": "NO"},
                "enable_cpu_affinity": True,
                "rdzv_backend": "c10d",
            }
        )
    )
    merged = merged_accelerate(accelerate_config(cfg, plan), str(path))
    assert merged["enable_cpu_affinity"] is True and merged["rdzv_backend"] == "c10d"
    assert merged["num_processes"] == 2 and merged["distributed_type"] == "MULTI_GPU"
    path.write_text(yaml.safe_dump({"num_processes": 8}))
    with pytest.raises(ConfigError, match=r"num_processes is 8 but this run has 2 \(from launcher.num_processes"):
        merged_accelerate(accelerate_config(cfg, plan), str(path))
    path.write_text(yaml.safe_dump({"distributed_type": "FSDP"}))
    with pytest.raises(ConfigError, match="distributed_type FSDP is not one this launcher runs"):
        merged_accelerate(accelerate_config(cfg, plan), str(path))
    with pytest.raises(ConfigError, match="launcher.accelerate_config=.*nope.yaml: cannot read it"):
        merged_accelerate(accelerate_config(cfg, plan), str(tmp_path / "nope.yaml"))
