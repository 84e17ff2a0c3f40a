"""One way to start a process and one to handle stop signals (run/process.py): every product module starts its
processes through `spawn`, `run_to_end` or `replace_process`, naming what becomes of the child when its parent dies,
and handles SIGTERM, SIGINT and SIGHUP through `StopSignals`, which records what came and gives the previous
handlers back."""

from __future__ import annotations

import ast
import os
import signal
import sys
import textwrap

import pytest

from lora_launch.run.process import ChildFate, StopSignals, run_to_end, spawn
from support.cli import REPO

PACKAGES = ("conf", "run", "data", "launcher", "train", "serve", "catalog", "sweep", "studio", "cli", "strategies")
HELPER = REPO / "run" / "process.py"
# calls that start a process or install a signal handler, by module; only the helper makes them
STARTS = {
    "subprocess": {"Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"},
    "os": {
        "system",
        "popen",
        "fork",
        "forkpty",
        "posix_spawn",
        "posix_spawnp",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "execv",
        "execve",
        "execvp",
        "execvpe",
        "spawnl",
        "spawnle",
        "spawnlp",
        "spawnlpe",
        "spawnv",
        "spawnve",
        "spawnvp",
        "spawnvpe",
    },
    "signal": {"signal"},
    "ctypes": set(),
}


def _direct_calls(tree: ast.Module) -> list[str]:
    """`module.name(...)` calls and `from module import name` imports of the names in STARTS, and any prctl."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "prctl":
            found.append(f"line {node.lineno}: prctl")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.attr in STARTS.get(node.func.value.id, ())
        ):
            found.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in STARTS:
            found += [
                f"line {node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in STARTS[node.module]
            ]
    return found


def _product_modules():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def test_only_the_helper_starts_processes_or_handles_signals():
    wrong = [
        f"{path.relative_to(REPO)} {hit}"
        for path, tree in _product_modules()
        if path != HELPER
        for hit in _direct_calls(tree)
    ]
    assert wrong == []


def test_the_scan_sees_each_kind_of_direct_call():
    code = textwrap.dedent("""
        import os, signal, subprocess
        from subprocess import Popen
        subprocess.Popen(["x"]); subprocess.run(["x"]); os.execv("x", ["x"]); signal.signal(2, None)
        libc.prctl(1, 9)
    """)
    assert len(_direct_calls(ast.parse(code))) == 6


def test_every_spawn_names_the_childs_fate():
    """`fate=` is keyword-only, so each site says by name what becomes of its child when its parent dies."""
    sites = [
        (path, node)
        for path, tree in _product_modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "spawn"
    ]
    assert len(sites) >= 4  # the launch of accelerate, a sweep's trials, the studio's launches and endpoints
    for path, node in sites:
        fate = next(k.value for k in node.keywords if k.arg == "fate")
        assert isinstance(fate, ast.Attribute) and fate.value.id == "ChildFate", path


# ---- what becomes of a child --------------------------------------------------------------------------

_REPORT = (
    "import ctypes, os; v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v)); "  # PR_GET_PDEATHSIG
    "print(os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpgid(os.getppid()), v.value)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize(
    "fate, own_session, death",
    [
        (ChildFate.KILLED_WITH_PARENT, True, signal.SIGKILL),
        (ChildFate.STOPS_WITH_PARENT, True, signal.SIGTERM),
        (ChildFate.LIVES_ON, True, 0),
        (ChildFate.SHARES_TERMINAL, False, 0),
    ],
)
def test_a_childs_session_and_parent_death_signal_follow_its_fate(fate, own_session, death):
    import subprocess

    proc = spawn([sys.executable, "-c", _REPORT], fate=fate, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert out.split() == [str(own_session), str(not own_session), str(int(death))]


def test_run_to_end_waits_in_this_session():
    out = run_to_end([sys.executable, "-c", "import os; print(os.getsid(0))"], capture_output=True, text=True)
    assert int(out.stdout) == os.getsid(0)


# ---- stop signals -------------------------------------------------------------------------------------
# raise_signal, not os.kill(getpid()): delivered to this thread, its handler runs before the next line (a signal to
# the process may land on another thread, an xdist worker's, and be handled after the check)


def test_the_first_stop_is_recorded_and_a_second_ctrl_c_is_told_apart():
    firsts, agains = [], []
    with StopSignals(firsts.append, lambda: agains.append(True)) as stops:
        assert not stops.requested and stops.signum is None
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # another stop, not a Ctrl-C: nothing more to do
        assert (stops.signum, stops.name, firsts, agains) == (signal.SIGTERM, "SIGTERM", [signal.SIGTERM], [])
        signal.raise_signal(signal.SIGINT)
        assert agains == [True] and stops.arrived == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]
    assert stops.signum == signal.SIGTERM  # still readable once the block is left


def test_a_first_ctrl_c_is_a_stop_and_the_second_ends_everything():
    firsts, agains = [], []
    with StopSignals(firsts.append, lambda: agains.append(True)) as stops:
        signal.raise_signal(signal.SIGINT)
        assert firsts == [signal.SIGINT] and agains == []
        signal.raise_signal(signal.SIGINT)
        assert agains == [True] and stops.name == "SIGINT"


def test_the_previous_handlers_come_back_when_the_block_ends():
    # Ctrl-C as a Python program starts with it (this test process may hold another handler by now)
    workers = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        with StopSignals(hangup_output=None):
            assert all(signal.getsignal(s) != handler for s, handler in before.items())
        assert {s: signal.getsignal(s) for s in before} == before
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C is Python's own again
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, workers)


def test_the_previous_handlers_come_back_after_an_error_in_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), StopSignals():
        raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) == before


def test_only_the_signals_named_are_taken():
    before = signal.getsignal(signal.SIGINT)
    stops = StopSignals(signals=(signal.SIGTERM,)).install()
    try:
        assert signal.getsignal(signal.SIGINT) == before
        signal.raise_signal(signal.SIGTERM)
        assert stops.signum == signal.SIGTERM
    finally:
        stops.restore()


def test_after_a_hangup_output_goes_to_the_file(tmp_path):
    """In a process of its own: a hangup moves this process's stdout and stderr for good."""
    log = tmp_path / "rank0.log"
    code = textwrap.dedent(f"""
        import os, signal, sys
        from lora_launch.run.process import StopSignals
        print("before", flush=True)
        with StopSignals(hangup_output={str(log)!r}) as stops:
            signal.raise_signal(signal.SIGHUP)
            print("after", stops.name, flush=True)
            print("on stderr", file=sys.stderr, flush=True)
    """)
    out = run_to_end([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "before\n" and out.stderr == ""
    assert log.read_text() == "after SIGHUP\non stderr\n"
