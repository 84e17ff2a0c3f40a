"""distributed=ddp: every process holds the whole model (torch DDP through accelerate); the base interface's
answers, unchanged."""

from __future__ import annotations

from lora_launch.strategies.base import Strategy


class Ddp(Strategy):
    name = "ddp"

    def problems(self, cfg) -> list[str]:
        d, found = cfg.distributed, super().problems(cfg)
        if d.zero_stage != 0:
            found.append(
                f"distributed.zero_stage={d.zero_stage} with distributed={d.name}: ZeRO stages are "
                "DeepSpeed's; use distributed=zero2 or zero3, or set distributed.zero_stage=0"
            )
        return found


STRATEGY = Ddp()
