"""Notices from the libraries underneath that a user cannot act on: kept out of every process this tool
starts (the launcher, the ranks, serve). LORA_LAUNCH_VERBOSE=1 shows them."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings


def quiet_third_party() -> None:
    """Silence the libraries' own notices for this process and the processes it starts."""
    if os.environ.get("LORA_LAUNCH_VERBOSE"):
        return
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecations of their own APIs
    warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled")  # inductor's note to itself
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")  # they run unpaged
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores")  # inductor's advice on fp32 runs
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..."
    # bitsandbytes asks the `kernels` package for a CPU kernel from the Hugging Face Hub; offline it says
    # "Skipping publisher trust check ..." and bitsandbytes falls back to its own
    logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # recompiles when the final sample is generated
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating train split: ..."
    atexit.register(_no_report_after_exit)  # early, so that it runs after the handlers registered later


def _no_report_after_exit() -> None:
    """With triton's bindings loaded (torch 2.15's triton 3.9; torch._dynamo loads them), the interpreter's
    shutdown ends in about sixty lines of "nanobind: leaked ..." on stderr, after a refusal's one line: the
    bindings' own teardown, nothing a user can act on. It comes after every atexit handler, so stderr is
    pointed at /dev/null once this process has said all it had to."""
    if "triton._C.libtriton" not in sys.modules:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing more goes there anyway
            pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
