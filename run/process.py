"""How the processes of a run end together: the launcher's children die with it, ranks stop on the
signals people and schedulers send, and the two sides agree on what a stop means.

- `lora-launch` starts `accelerate launch` with `die_with_parent(SIGKILL)`; every rank arms
  `die_with_parent(SIGTERM)`, so whatever kills the launcher (SIGKILL, a closed terminal) reaches the
  ranks as a stop request: they stop after the current step, checkpoint and exit. An orphaned rank
  that cannot finish (a peer is gone and a collective hangs) ends itself after ORPHAN_GRACE_S.
- SIGTERM (Slurm, cloud preemption), SIGINT (Ctrl-C) and SIGHUP all mean "stop after this step with a
  checkpoint" once training runs; before that there is nothing to save and they end the rank at once.

Every process the product starts is started here (`spawn`, `run_to_end`, `replace_process`), each with what
becomes of it when its parent dies named by a `ChildFate`; every stop-signal handler is a `StopSignals`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from enum import Enum
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


class ChildFate(Enum):
    """What becomes of a child process when the process that started it dies, and which signals reach it."""

    KILLED_WITH_PARENT = "killed with its parent"  # its own session; SIGKILL when the parent dies
    STOPS_WITH_PARENT = "stops with its parent"  # its own session; SIGTERM (stop with a checkpoint) when it dies
    LIVES_ON = "lives on"  # its own session; runs on after the parent is gone
    SHARES_TERMINAL = "shares the parent's terminal"  # the parent's session: a terminal's Ctrl-C reaches both


_DEATH_SIGNAL = {ChildFate.KILLED_WITH_PARENT: signal.SIGKILL, ChildFate.STOPS_WITH_PARENT: signal.SIGTERM}


def spawn(argv: list[str], *, fate: ChildFate, **options) -> subprocess.Popen:
    """Start `argv` beside this process with the given fate; `options` are Popen's (env, cwd, stdin, stdout, ...).

    A child in a session of its own gets no signal from this process's terminal: this process passes on
    the stops it means (launcher/supervise.py, sweep/sweeper.py)."""
    death = _DEATH_SIGNAL.get(fate)
    return subprocess.Popen(
        argv,
        start_new_session=fate is not ChildFate.SHARES_TERMINAL,
        preexec_fn=None if death is None else lambda: die_with_parent(death),
        **options,
    )


def run_to_end(argv: list[str], **options) -> subprocess.CompletedProcess:
    """Run `argv` in this process's session and wait for it (a preview, a system tool's answer); `options`
    are subprocess.run's. Its fate is ChildFate.SHARES_TERMINAL, and this process waits for its end."""
    return subprocess.run(argv, **options)


def replace_process(argv: list[str], env: dict[str, str] | None = None) -> NoReturn:
    """Become `argv` (found on PATH unless it names a path): the same pid, so whatever waits for or signals this
    process now waits for or signals the new program. `env`: its environment (default: this one's)."""
    if env is None:
        os.execvp(argv[0], argv)
    os.execvpe(argv[0], argv, env)


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP recorded instead of ending the process, from `with` to its end (or from
    `install()` on, for the rest of the process's life); the previous handlers come back on leaving.

    `on_first(signum)` runs for the first stop signal, `on_ctrl_c_again()` for each SIGINT after it (a second
    Ctrl-C: end everything now). After SIGHUP the terminal is gone, so stdout and stderr go to
    `hangup_output` (None: left alone). With `orphan_grace_s`, a stop signal that comes once this process's
    parent is gone ends it that many seconds later regardless: nobody is left to kill it if it hangs.
    """

    def __init__(
        self,
        on_first: Callable[[int], None] | None = None,
        on_ctrl_c_again: Callable[[], None] | None = None,
        *,
        hangup_output: str | None = os.devnull,
        orphan_grace_s: float | None = None,
        signals: tuple[int, ...] = STOP_SIGNALS,
    ):
        self.on_first, self.on_ctrl_c_again = on_first, on_ctrl_c_again
        self.hangup_output, self.orphan_grace_s, self.signals = hangup_output, orphan_grace_s, signals
        self.arrived: list[int] = []  # every stop signal that came, in order
        self._parent = os.getppid()
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.signals}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *_exc) -> None:
        self.restore()

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP and self.hangup_output:  # the terminal is gone: writes to it would fail
            redirect_output(self.hangup_output)
        first = not self.arrived
        self.arrived.append(signum)
        if self.orphan_grace_s is not None and os.getppid() != self._parent:
            timer = threading.Timer(self.orphan_grace_s, lambda: os._exit(128 + signum))
            timer.daemon = True
            timer.start()
        if first:
            if self.on_first is not None:
                self.on_first(signum)
        elif signum == signal.SIGINT and self.on_ctrl_c_again is not None:
            self.on_ctrl_c_again()

    @property
    def signum(self) -> int | None:
        """The first stop signal that came, else None."""
        return self.arrived[0] if self.arrived else None

    @property
    def requested(self) -> bool:
        return bool(self.arrived)

    @property
    def name(self) -> str | None:
        return signal_name(self.signum)
