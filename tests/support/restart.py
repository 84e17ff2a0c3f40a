"""Helpers for the restart tests: their run's overrides, and a SIGKILL to one rank."""

from __future__ import annotations

import os
import signal

import psutil

from support.resume import BASE

# the resume tests' small run, one thread per process (as torchrun sets for several processes per node,
# so a run of one process on each of two nodes computes alike), with restarts
RESTART_BASE = [
    *(o for o in BASE if not o.startswith("launcher.max_restarts=")),
    "train.threads=1",
    "launcher.max_restarts=2",
]


def train_ranks(pids: list[int] | None = None) -> list[psutil.Process]:
    """Training processes (`-m lora_launch.train`, not their data-loader workers), among `pids` if given."""
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)] if pids is not None else psutil.process_iter()
    ranks = []
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "-m" in cmd and cmd[cmd.index("-m") + 1 :][:1] == ["lora_launch.train"]:
            ranks.append(p)
    pids_of_ranks = {p.pid for p in ranks}
    return [p for p in ranks if _parent(p) not in pids_of_ranks]


def _parent(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.Error:
        return None


def rank_env(p: psutil.Process, name: str) -> str | None:
    try:
        return p.environ().get(name)
    except psutil.Error:
        return None


def kill_rank(below: int, rank: int) -> int:
    """SIGKILL the training process of global `rank` under process `below`; returns its pid."""
    tree = [c.pid for c in psutil.Process(below).children(recursive=True)]
    found = [p for p in train_ranks(tree) if rank_env(p, "RANK") == str(rank)]
    assert found, f"no rank {rank} under pid {below}"
    os.kill(found[0].pid, signal.SIGKILL)
    return found[0].pid
