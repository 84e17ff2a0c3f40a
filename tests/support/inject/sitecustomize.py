"""Faults injected into a run's processes from the test side. support.inject.env puts this folder first on
a launch's PYTHONPATH, which every process it starts inherits (accelerate's and torchrun's ranks too), so
Python imports this file at start-up in each of them. A fault named in the environment patches a product
module right after that module is first executed; the product itself knows nothing of these faults.

SLOW_CHECKPOINT_WRITE_S=S: every checkpoint's file writing sleeps S seconds first, so a background save
    is still in flight when the next steps run, and when a stop comes.
CRASH_IN_SAVE=PHASE or PHASE@STEP: rank 0 dies by SIGKILL inside the commit of a checkpoint (of that step),
    at PHASE: after_rank_write (every rank wrote its files, before the barrier), before_commit (the manifest
    written, before the rename), after_commit (renamed, `latest` not yet updated). Under torchrun it kills
    its launcher parent first, like a lost node: the other ranks die with their parent (train/__main__.py
    arms PR_SET_PDEATHSIG).
FAIL_AFTER_STEP=N or N@RANK: rank RANK (0 if not given) raises after step N, before that step's checkpoint,
    every time it gets there (a restart must notice that a failure repeats).
"""

import functools
import importlib.abc
import importlib.util
import os
import signal
import sys
import time

CHECKPOINT = "lora_launch.train.checkpoint"
LOOP = "lora_launch.train.loop"


def _slow_checkpoint_writes(checkpoint, value: str) -> None:
    seconds = float(value)
    write = checkpoint._write_rank_files

    def slow_write(*args, **kwargs):
        time.sleep(seconds)
        return write(*args, **kwargs)

    checkpoint._write_rank_files = slow_write


def _crash_in_save(checkpoint, value: str) -> None:
    phase, _, at = value.partition("@")

    def crash(step: int, rank: int) -> None:
        if rank != 0 or (at and int(at) != step):
            return
        print(f"checkpoint: CRASH_IN_SAVE={value}: crashing at step {step}", flush=True)
        if os.environ.get("TORCHELASTIC_RUN_ID"):
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    cls = checkpoint.Checkpointer
    finish_commit, rename_committed = cls._finish_commit, cls._rename_committed

    def crash_first(self, staging, step, *args, **kwargs):
        crash(step, self.rank)
        return finish_commit(self, staging, step, *args, **kwargs)

    def rename_and_crash(self, staging, step):
        if phase == "before_commit":
            crash(step, self.rank)
        final = rename_committed(self, staging, step)
        if phase == "after_commit":
            crash(step, self.rank)
        return final

    if phase == "after_rank_write":
        cls._finish_commit = crash_first
    elif phase in ("before_commit", "after_commit"):
        cls._rename_committed = rename_and_crash
    else:
        raise ValueError(f"CRASH_IN_SAVE={value}: no such phase {phase!r}")


def _fail_after_step(loop, value: str) -> None:
    at, _, who = value.partition("@")
    save_checkpoint = loop.Trainer._save_checkpoint

    def fail_first(self, *args, **kwargs):
        if self.step == int(at) and self.rank == int(who or 0):
            raise RuntimeError(f"FAIL_AFTER_STEP={value}: injected failure after step {self.step}")
        return save_checkpoint(self, *args, **kwargs)

    loop.Trainer._save_checkpoint = fail_first


FAULTS = {  # environment variable: (the module its patch applies to, the patch)
    "SLOW_CHECKPOINT_WRITE_S": (CHECKPOINT, _slow_checkpoint_writes),
    "CRASH_IN_SAVE": (CHECKPOINT, _crash_in_save),
    "FAIL_AFTER_STEP": (LOOP, _fail_after_step),
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Applies the patches of each module in `patches` right after that module is first executed."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        patches = self.patches.pop(name)
        if not self.patches:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for patch in patches:
                patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    patches = {}
    for name, (module, patch) in FAULTS.items():
        if os.environ.get(name):
            patches.setdefault(module, []).append(functools.partial(patch, value=os.environ[name]))
    if patches:
        sys.meta_path.insert(0, _AfterImport(patches))


_install()
