"""Where the concurrent trials of a sweep run: each slot has its own devices and CPU threads.

A trial in slot k sees only its slot's GPUs (CUDA_VISIBLE_DEVICES), so its `launcher.num_processes`
(`auto` too) counts them alone. On CPU, trials side by side share the cores out: each process gets
cores / (trials at once x processes) threads (OMP_NUM_THREADS); a lone trial runs as a plain launch does.
Their ranks' rendezvous ports need no plan: a launch on one node takes a free one itself
(launcher/restart.py `rendezvous_port`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lora_launch.conf.schema import ConfigError


@dataclass(frozen=True)
class Slot:
    index: int
    gpus: tuple[str, ...]  # CUDA device ids for CUDA_VISIBLE_DEVICES; () on CPU
    threads: int | None  # OMP_NUM_THREADS per process on CPU; None on GPUs

    def env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """The environment variables a trial in this slot runs with (a user's OMP_NUM_THREADS wins)."""
        environ = os.environ if environ is None else environ
        env = {}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        if self.threads is not None and "OMP_NUM_THREADS" not in environ:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def describe(self) -> str:
        where = (
            f"GPUs {','.join(self.gpus)}"
            if self.gpus
            else f"{self.threads} thread(s) per process"
            if self.threads
            else "CPU"
        )
        return f"slot {self.index}: {where}"


def visible_gpu_ids(environ: dict[str, str] | None = None, count: int | None = None) -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (its own list when set, else 0..count-1)."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if count is None:
        from lora_launch.launcher.topology import visible_gpus

        count = visible_gpus()
    return [str(i) for i in range(count)]


def plan_slots(parallel: int | str, procs_per_trial: int | str, gpus: list[str], cores: int) -> list[Slot]:
    """The slots of a sweep: how many trials run at once and on what.

    `parallel` is sweep.parallel (`auto`: as many trials as the GPUs hold, 1 on CPU), `procs_per_trial`
    is launcher.num_processes (`auto`: the GPUs divided among the trials, 1 on CPU).
    """
    if gpus:
        if parallel == "auto":
            per = len(gpus) if procs_per_trial == "auto" else int(procs_per_trial)
            count = max(1, len(gpus) // per)
        else:
            count = int(parallel)
            per = len(gpus) // count if procs_per_trial == "auto" else int(procs_per_trial)
        if per < 1 or count * per > len(gpus):
            raise ConfigError(
                f"sweep.parallel={parallel} trials x launcher.num_processes={procs_per_trial} need "
                f"{count * max(per, 1)} GPUs; {len(gpus)} are visible: lower one of them"
            )
        return [Slot(k, tuple(gpus[k * per : (k + 1) * per]), None) for k in range(count)]
    count = 1 if parallel == "auto" else int(parallel)
    per = 1 if procs_per_trial == "auto" else int(procs_per_trial)
    # a lone trial runs as a plain launch does; trials side by side share the cores out
    threads = max(1, cores // (count * per)) if count > 1 else None
    return [Slot(k, (), threads) for k in range(count)]


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
