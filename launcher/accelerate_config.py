"""The accelerate config file, derived from the resolved config and the run plan.

A pure function: config in, dict out. Every value comes from the config and the plan (the
DeepSpeed JSON too: `lora_launch.run.plan.deepspeed_config`), so the files in a run directory
can never disagree with what trains.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lora_launch.run.plan import RunPlan


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
    if cfg.distributed.strategy == "deepspeed":
        conf["distributed_type"] = "DEEPSPEED"
        del conf["mixed_precision"]  # the DeepSpeed JSON owns precision; accelerate refuses both
        conf["deepspeed_config"] = {"deepspeed_config_file": ds_config_path, "zero3_init_flag": False,
                                    "deepspeed_multinode_launcher": "standard"}
    else:
        # MULTI_GPU is accelerate's name for "start processes with torchrun"; on CPU they use gloo. FSDP2 too:
        # the ranks shard the model themselves (train/fsdp.py), as RUN/fsdp2.json shows
        conf["distributed_type"] = "MULTI_GPU" if multi else "NO"
    if multi:
        conf["main_process_port"] = launcher.main_process_port
    return conf
