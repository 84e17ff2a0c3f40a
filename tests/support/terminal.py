"""Processes started the way an interactive shell starts a foreground job, and the signals a terminal sends.

A shell runs a job in its own process group with SIGINT at its default action; Ctrl-C sends SIGINT to that
whole group, and closing the terminal sends SIGHUP. (A background job of a script would ignore SIGINT:
the preexec here restores it, as an interactive shell does.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from support.cli import CLI, subprocess_env


def _foreground_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgid(0, 0)


def start_job(args: list[str], cwd: Path, log: Path, cmd: list[str] | None = None) -> subprocess.Popen:
    """Start `lora-launch args` (or `cmd`) as a foreground job of its own process group, output into `log`."""
    out = open(log, "a")
    return subprocess.Popen(
        cmd or [CLI, *args], cwd=cwd, env=subprocess_env(), stdout=out, stderr=out, preexec_fn=_foreground_job
    )


def ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)


def ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes below `proc` (`python -m lora_launch.train`)."""
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in below:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "-m" in cmd and cmd[cmd.index("-m") + 1] == "lora_launch.train":
            out.append(p)
    return out


def wait_for_ranks(proc: subprocess.Popen, n: int, timeout: float = 120.0) -> list[psutil.Process]:
    """Block until `n` training processes run below `proc`; returns them."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = ranks(proc)
        if len(found) >= n:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{n} training processes did not start within {timeout} s")


def gone_within(procs: list[psutil.Process], seconds: float) -> bool:
    """Whether every process in `procs` has exited (or become a zombie) within `seconds`."""
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    return all(_zombie(p) for p in alive)


def _zombie(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
