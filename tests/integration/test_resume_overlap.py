"""A stop that comes while a background save is still being written: the run commits that save, takes its
own checkpoint, and the re-run continues bit for bit. The checkpoint writer is slowed from the test side
(support.inject) so the overlap happens every time, not by chance."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from support import inject
from support.resume import BASE, descendants, launch, reference, start, status, train_losses, wait_for_step

SLOW = inject.env(SLOW_CHECKPOINT_WRITE_S="3")


@pytest.fixture(scope="module")
def args(tiny):
    return tiny["overrides"] + BASE + ["checkpoint.background_min_mib=0"]


@pytest.mark.parametrize("stop", ["sigterm", "launcher-killed"])
def test_a_stop_during_a_background_save_resumes_bit_for_bit(tiny, args, tmp_path_factory, tmp_path, stop):
    run = tmp_path / "run"
    proc = start(run, args, env=SLOW)
    wait_for_step(run, proc, 4)  # step 3's save is due and its writer sleeps 3 s: still in flight
    everyone = descendants(proc.pid)
    if stop == "sigterm":
        os.killpg(proc.pid, signal.SIGTERM)  # a scheduler's preemption
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher alone: the ranks live in their own session
    proc.wait(timeout=120)
    wait_gone(everyone)  # orphaned ranks finish their stop after the launcher is gone
    assert status(run)["state"] == "preempted", status(run)
    log = open(f"{run}.log").read()
    stopped = int(re.findall(r"step (\d+): checkpoint saved", log)[-1])
    in_flight = (stopped - 1) // 3 * 3  # the periodic save before the stop's own (checkpoint.every_steps=3)
    # the stop waited for that save's writer (training paused for it), committed it, then saved its own step
    waited = re.search(
        rf"step {stopped}: checkpoint of step {in_flight} committed \([\d.]+ MiB written in "
        rf"[\d.]+ s in the background; training paused ([\d.]+) s\)",
        log,
    )
    assert in_flight >= 3 and waited and float(waited.group(1)) >= 1.0, log
    rc, relog = launch(run, args, env=SLOW)
    assert rc == 0 and f"resumed from {run}/checkpoints/step-{stopped}" in relog, relog[-3000:]
    # bitwise the losses of the same run uninterrupted, its saves written at once (as test_user_paths' reruns)
    assert train_losses(run) == reference(tiny, tmp_path_factory.getbasetemp(), BASE)["train"]
    assert status(run)["state"] == "finished"


def wait_gone(pids: list[int], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid):
            assert time.monotonic() < deadline, f"process {pid} still running"
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/status").read().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
