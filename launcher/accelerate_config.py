"""The accelerate config file, derived from the resolved config and the run plan.

A pure function: config in, dict out. Every value comes from the config and the plan (the
DeepSpeed JSON too: the strategy's `deepspeed_config`), so the files in a run directory
can never disagree with what trains.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lora_launch.run.plan import RunPlan
from lora_launch.strategies import strategy_for


def accelerate_config(cfg: DictConfig, plan: RunPlan, ds_config_path: str | None = None) -> dict:
    """accelerate's config-file dict for one launch of `plan.world_size` processes in total."""
    launcher = cfg.launcher
    num_processes = plan.world_size
    multi = num_processes > 1 or launcher.num_machines > 1
    conf = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "num_processes": num_processes,
        "num_machines": launcher.num_machines,
        "machine_rank": launcher.machine_rank,
        "main_training_function": "main",
        "mixed_precision": plan.mixed_precision,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "downcast_bf16": "no",
        "gpu_ids": "all",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if launcher.num_machines > 1:
        conf["main_process_ip"] = launcher.main_process_ip
        conf["main_process_port"] = launcher.main_process_port
    strategy = strategy_for(cfg)
    if strategy.deepspeed_config(cfg, plan) is not None:
        del conf["mixed_precision"]  # the DeepSpeed JSON owns precision; accelerate refuses both
    # FSDP2 starts its processes as DDP does: the ranks shard the model themselves (train/fsdp.py), as
    # RUN/fsdp2.json shows
    conf.update(strategy.accelerate_settings(multi, ds_config_path))
    if multi:
        conf["main_process_port"] = launcher.main_process_port
    return conf
