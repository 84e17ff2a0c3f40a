"""Faults injected into a run's processes from the test side: this folder goes first on the ranks'
PYTHONPATH (see support.inject.env) and Python imports this file at start-up.

SLOW_CHECKPOINT_WRITE_S=S: every checkpoint's file writing sleeps S seconds first, so a background save
is still in flight when the next steps run, and when a stop comes.
"""

import importlib.abc
import os
import sys
import time

TARGET = "lora_launch.train.checkpoint"


def _slow_down(module) -> None:
    seconds = float(os.environ["SLOW_CHECKPOINT_WRITE_S"])
    write = module._write_rank_files

    def slow_write(*args, **kwargs):
        time.sleep(seconds)
        return write(*args, **kwargs)

    module._write_rank_files = slow_write


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches TARGET right after it is first executed."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _slow_down(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("SLOW_CHECKPOINT_WRITE_S"):
    import importlib.util

    sys.meta_path.insert(0, _AfterImport())
