"""How the processes of a run end together: the launcher's children die with it, ranks stop on the
signals people and schedulers send, and the two sides agree on what a stop means.

- `lora-launch` starts `accelerate launch` with `die_with_parent(SIGKILL)`; every rank arms
  `die_with_parent(SIGTERM)`, so whatever kills the launcher (SIGKILL, a closed terminal) reaches the
  ranks as a stop request: they stop after the current step, checkpoint and exit. An orphaned rank
  that cannot finish (a peer is gone and a collective hangs) ends itself after ORPHAN_GRACE_S.
- SIGTERM (Slurm, cloud preemption), SIGINT (Ctrl-C) and SIGHUP all mean "stop after this step with a
  checkpoint" once training runs; before that there is nothing to save and they end the rank at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

SUPERVISOR_ENV = "LORA_LAUNCH_SUPERVISOR"  # pid of the lora-launch that started this rank
NODE_RANK_ENV = "LORA_LAUNCH_NODE_RANK"  # this node's rank, as the launcher knows it
ATTEMPT_ENV = "LORA_LAUNCH_ATTEMPT"  # which attempt of the launch this is: 0, then one more per restart
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
ORPHAN_GRACE_S = 120.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; a no-op elsewhere).

    Also usable as a `preexec_fn`, where it applies to the child being started.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))


def signal_name(signum: int | None) -> str | None:
    return None if signum is None else signal.Signals(signum).name


def end_at_once_on_stop_signals() -> None:
    """Before training runs: a stop signal ends the process at once and without a traceback."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)


def exit_on_closed_stdout() -> NoReturn:
    """The reader of stdout went away (`lora-launch --help | head -1`): exit 1 without a word, as Unix
    tools do. stdout now points at os.devnull, so what is still buffered cannot fail again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(1)


def redirect_output(path: str) -> None:
    """Send this process's stdout and stderr to the file `path` (appending) from now on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


class _OutputGuard:
    """sys.stdout/sys.stderr of a rank: a write that fails because the reader is gone (the launcher
    killed, the terminal closed) sends this process's output to a file instead of ending training."""

    fallback = os.devnull  # set to RUN/rank<R>.log once the run dir is known

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except (BrokenPipeError, OSError):
            redirect_output(_OutputGuard.fallback)
            return self._stream.write(text)

    def flush(self):
        try:
            self._stream.flush()
        except (BrokenPipeError, OSError):
            redirect_output(_OutputGuard.fallback)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_output(fallback: str | None = None) -> None:
    """Install the output guard (once) and, when given, the file output goes to if the reader goes away."""
    if fallback is not None:
        _OutputGuard.fallback = fallback
    if not isinstance(sys.stderr, _OutputGuard):
        sys.stdout, sys.stderr = _OutputGuard(sys.stdout), _OutputGuard(sys.stderr)


class StopRequest:
    """The stop signals of a rank once training runs: the first one is recorded, the loop polls it."""

    def __init__(self, log_path: str | None = None):
        self.signum: int | None = None
        self.log_path = log_path  # where output goes once the terminal hangs up
        self._parent = os.getppid()

    def install(self) -> "StopRequest":
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGHUP and self.log_path:  # the terminal is gone: writes to it would fail
            redirect_output(self.log_path)
        if os.getppid() != self._parent:  # the launcher is gone: nobody will come to kill us if we hang
            timer = threading.Timer(ORPHAN_GRACE_S, lambda: os._exit(128 + signum))
            timer.daemon = True
            timer.start()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal_name(self.signum)
