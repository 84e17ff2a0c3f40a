"""Run at the start of every Python process that `bench.side_by_side --deterministic-algorithms` starts (this
folder leads their PYTHONPATH): torch's deterministic algorithms on, which Inductor follows too, before any
training code runs. Ops without a deterministic form warn instead of failing, so the run still ends."""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for repeatable results
try:
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
except ImportError:  # a process without torch (none of the launch's, but harmless)
    pass
