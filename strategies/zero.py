"""distributed=zero2|zero3|zero3_offload: DeepSpeed ZeRO through accelerate. Stage 2 shards the optimizer state
and gradients over the processes, stage 3 the parameters too; offload moves the optimizer state and the
parameters to CPU memory. The adapter to ZeRO's internals for checkpoints is lora_launch.train.zero."""

from __future__ import annotations

from lora_launch.strategies.base import MemoryTerms, Strategy

STAGES = (2, 3)  # the ZeRO stages run here
# bitsandbytes' optimizers with 8-bit states: ZeRO keeps the optimizer state in its own fp32 partitions
EIGHT_BIT_OPTIMIZERS = ("adamw_bnb_8bit", "paged_adamw_8bit")


def _sharded(cfg) -> bool:
    return cfg.distributed.zero_stage == 3


class Zero(Strategy):
    name = "deepspeed"
    needs = ("deepspeed", "deepspeed")

    def problems(self, cfg) -> list[str]:
        d, found = cfg.distributed, super().problems(cfg)
        if cfg.optim.name in EIGHT_BIT_OPTIMIZERS:
            found.append(
                f"optim.name={cfg.optim.name} with distributed={d.name}: ZeRO keeps the optimizer state in "
                "its own fp32 partitions; use optim.name=adamw_torch or distributed=ddp"
            )
        if d.zero_stage not in STAGES:
            found.append(f"distributed.zero_stage={d.zero_stage}: DeepSpeed here runs ZeRO stage 2 or 3")
        return found

    def shards_weights(self, cfg) -> bool:
        return _sharded(cfg)

    def places_weights(self, cfg) -> bool:
        return _sharded(cfg)  # ZeRO-3 places (and shards) the weights itself

    def compile_on_gpu(self, cfg) -> str:
        return "loss" if _sharded(cfg) else "layers"  # dynamo cannot trace ZeRO-3's sharded weights

    def gathers_whole_layers(self, cfg) -> bool:
        # without grad ckpt DeepSpeed 0.19.8 frees a leaf layer's weights before PEFT's LoRA backward needs them:
        # only the checkpointed layers are gathered whole (lora_launch.train.zero). train.grad_ckpt is false or 0
        # where none is, and a true, a count, a budget or auto otherwise
        return _sharded(cfg) and bool(cfg.train.grad_ckpt)

    def accelerate_settings(self, multi: bool, deepspeed_file: str | None) -> dict:
        return {
            "distributed_type": "DEEPSPEED",
            "deepspeed_config": {
                "deepspeed_config_file": deepspeed_file,
                "zero3_init_flag": False,
                "deepspeed_multinode_launcher": "standard",
            },
        }

    def deepspeed_config(self, cfg, plan) -> dict:
        """DeepSpeed JSON for distributed.zero_stage, with batch sizes, precision and clipping from the plan."""
        d, t = cfg.distributed, cfg.train
        zero: dict = {
            "stage": d.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
        }
        if _sharded(cfg):
            zero.update(
                {
                    "stage3_gather_16bit_weights_on_model_save": True,
                    "stage3_prefetch_bucket_size": 5e7,
                    "stage3_param_persistence_threshold": 1e5,
                }
            )
        if d.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if d.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": plan.global_batch,
            "gradient_clipping": float(cfg.optim.max_grad_norm),
            "bf16": {"enabled": plan.precision == "bfloat16"},
            "fp16": {"enabled": plan.precision == "float16"},
            "zero_optimization": zero,
            # the loop brings its own torch AdamW (LoRA params are few); DeepSpeed must accept it
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def label(self, plan) -> str:
        return f"ZeRO-{plan.zero_stage}"

    def scaling(self, cfg, plan) -> tuple[float, str]:
        if not _sharded(cfg):  # stage 2 ran level with DDP on 4 GPUs
            return super().scaling(cfg, plan)
        # every layer gathered in every pass through DeepSpeed's hooks: measured against DDP at world size 1
        # and on 4 GPUs (14%); with grad ckpt (whole decoder layers as ZeRO's leaves, the default) 30% of DDP
        # without the hooks
        share = 0.30 if cfg.train.grad_ckpt else 0.14
        return share, "ZeRO-3 against DDP, measured at world size 1 and on 4 GPUs of one host"

    def running(self, distributed_type: str, processes: int, plan) -> str:
        if distributed_type == "DEEPSPEED":
            return f"DeepSpeed ZeRO-{plan.zero_stage}"
        return super().running(distributed_type, processes, plan)

    def memory(self, cfg, plan, weights, lora_params, gathered) -> MemoryTerms:
        d, world = cfg.distributed, plan.world_size
        if _sharded(cfg):
            weights = 0.0 if d.offload_params else weights / world
        grads = lora_params * 4.0 / world  # stage 2 and 3 shard the gradients
        optimizer = 0.0 if d.offload_optimizer else lora_params * 12.0 / world  # + an fp32 master copy
        return MemoryTerms(weights, lora_params * 4.0 + grads, optimizer)


STRATEGY = Zero()
