"""How a rank ends (run/teardown.py): its process group destroyed, then no gloo worker left running, since one
that frees a collective's Python objects while the interpreter shuts down aborts the process."""

from __future__ import annotations

import time

import torch.distributed as dist

from lora_launch.run import teardown
from support.ports import free_port


def test_the_group_is_destroyed_and_its_idle_workers_are_seen_asleep():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert teardown._gloo_workers_running() is False  # the workers exist, waiting for work
    finally:
        teardown.end_process_group()
    assert not dist.is_initialized()


def test_it_waits_for_two_quiet_looks_in_a_row(monkeypatch):
    looks = iter([True, False, True, True, False, False, True])
    seen = []
    monkeypatch.setattr(teardown, "_gloo_workers_running", lambda: seen.append(1) or next(looks))
    teardown.end_process_group()
    assert len(seen) == 6


def test_a_worker_that_never_rests_is_waited_for_no_longer_than_the_settle_time(monkeypatch):
    monkeypatch.setattr(teardown, "_gloo_workers_running", lambda: True)
    start = time.monotonic()
    teardown.end_process_group(settle_s=0.2)
    assert 0.2 <= time.monotonic() - start < 2
