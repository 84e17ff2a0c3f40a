"""What the estimate tests need to know of bench/results rows measured on code that has since changed."""

from __future__ import annotations

# fsdp2 at world size 1 sharded the frozen base too, until it stayed whole where a copy has one process
FROZEN_SHARDED_AT_WS1 = {
    "2026-11-29-h200-sharding-3.jsonl",
    "2026-11-29-h200-sharding-5.jsonl",
    "2026-11-30-h200-keep-1.jsonl",
    "2026-11-30-h200-keep-3.jsonl",
}


def as_measured(results: str, monkeypatch) -> None:
    """Estimate a row of `results` with the code path it ran on."""
    if results in FROZEN_SHARDED_AT_WS1:  # the gathers of the base counted, as they ran then
        monkeypatch.setattr("lora_launch.strategies.fsdp2.shards_frozen_weights", lambda cfg, plan: True)
