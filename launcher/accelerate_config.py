"""The accelerate config file and DeepSpeed JSON, derived from the resolved Hydra config.

Pure functions: config in, dicts out. Every value comes from the Hydra config, so the files in a
run directory can never disagree with it.
"""

from __future__ import annotations

from omegaconf import DictConfig


def _precision(cfg: DictConfig) -> str:
    from lora_launch.train.model import resolve_precision

    return resolve_precision(cfg.train.precision)


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    """DeepSpeed JSON for distributed.zero_stage, with batch sizes, precision and clipping from cfg."""
    d, t = cfg.distributed, cfg.train
    zero: dict = {"stage": d.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": 5e7}
    if d.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True,
                     "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5})
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    precision = _precision(cfg)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.max_grad_norm),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        # the loop brings its own torch AdamW (LoRA params are few); DeepSpeed must accept it
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def accelerate_config(cfg: DictConfig, num_processes: int, ds_config_path: str | None = None) -> dict:
    """accelerate's config-file dict for one launch of `num_processes` processes in total."""
    launcher = cfg.launcher
    multi = num_processes > 1 or launcher.num_machines > 1
    conf = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "num_processes": num_processes,
        "num_machines": launcher.num_machines,
        "machine_rank": launcher.machine_rank,
        "main_training_function": "main",
        "mixed_precision": _precision(cfg),
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
        # MULTI_GPU is accelerate's name for "start processes with torchrun"; on CPU they use gloo
        conf["distributed_type"] = "MULTI_GPU" if multi else "NO"
    if multi:
        conf["main_process_port"] = launcher.main_process_port
    return conf
