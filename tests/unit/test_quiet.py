"""The libraries' notices kept out of this tool's processes (run/quiet.py): here, the report triton's bindings
print at interpreter shutdown, after every atexit handler (torch 2.15 with triton 3.9)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# a process of this tool ending with a refusal's one line; a handler registered before quiet_third_party runs
# after it, where the bindings' own teardown prints (C, straight to fd 2)
ENDING = textwrap.dedent(
    """
    import atexit, os, sys, types
    atexit.register(lambda: os.write(2, b"nanobind: leaked 514 functions!\\n"))
    if sys.argv[1] == "loaded":
        sys.modules["triton._C.libtriton"] = types.ModuleType("triton._C.libtriton")
    from lora_launch.run.quiet import quiet_third_party
    quiet_third_party()
    print("error: lora.r=0 must be >= 1", file=sys.stderr)
    sys.exit(2)
    """
)


def _stderr(bindings: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", ENDING, bindings],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "LORA_LAUNCH_VERBOSE"} | env,
        timeout=60,
    )
    assert proc.returncode == 2
    return proc.stderr


def test_the_bindings_report_after_exit_is_not_shown():
    assert _stderr("loaded") == "error: lora.r=0 must be >= 1\n"


@pytest.mark.parametrize(
    "bindings, env", [("absent", {}), ("loaded", {"LORA_LAUNCH_VERBOSE": "1"})], ids=["no-triton", "verbose"]
)
def test_stderr_stays_open_without_them_or_when_asked(bindings, env):
    assert _stderr(bindings, **env) == "error: lora.r=0 must be >= 1\nnanobind: leaked 514 functions!\n"
