"""How a process of this tool ends: without the interpreter's last garbage collections, and with no thread of
its process group left working on Python objects while the interpreter shuts down."""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time


def skip_final_collections() -> None:
    """At exit, leave every object to the operating system instead of the cyclic collector: with torch and
    transformers imported, the interpreter's collections at shutdown walk millions of objects (0.5 to 1.5 s of
    CPU per process, and a launch ends two of ours). Nothing here waits on a cycle being freed: files,
    trackers and process groups are closed explicitly (`end_process_group`), and objects freed by reference
    count still are."""
    atexit.register(gc.freeze)  # registered first, so it runs after the handlers that libraries register later


def end_process_group(settle_s: float = 2.0) -> None:
    """Destroy this process's torch.distributed group and wait until gloo's worker threads are asleep.

    A gloo worker frees each collective after reporting it done, and with it the Python objects the call
    captured from its thread (the autograd context of a backward pass), which takes the GIL. Should the
    interpreter be shutting down by then, the thread is ended inside a destructor and the process aborts
    ("terminate called without an active exception", SIGABRT): a second line under a refusal, a failed rank
    after a finished run. Destroying the group does not join those threads while a DDP reducer still holds
    it, so this waits, up to `settle_s`, until none of them is running or runnable (Linux; elsewhere it
    yields for 10 ms)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return
    if dist.is_initialized():  # still up after a refusal; a finished run's trainer destroyed it
        dist.destroy_process_group()
    deadline, quiet = time.monotonic() + settle_s, 0
    while quiet < 2 and time.monotonic() < deadline:  # two looks in a row: a worker between two states
        time.sleep(0.005)  # lets a worker take the GIL it may be waiting for
        quiet = 0 if _gloo_workers_running() else quiet + 1


def _gloo_workers_running() -> bool:
    """Whether one of gloo's worker threads is running or runnable now (its state in /proc)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
        if name.startswith("pt_gloo") and state == "R":  # a worker (the transport's loop wakes every 10 ms)
            return True
    return False
