"""Run `accelerate launch` under supervision: stop signals reach the ranks, a second Ctrl-C ends
everything at once, and nothing outlives the launcher for long.

`accelerate launch` starts in its own session (a terminal's Ctrl-C reaches only `lora-launch`) and
dies with `lora-launch` (PR_SET_PDEATHSIG). Stop signals (SIGTERM, SIGINT, SIGHUP) are passed to the
ranks themselves, not to accelerate's launcher or torchrun's agent: the ranks stop after the same
step, checkpoint and exit 0, and accelerate exits as after any finished run. Signalling the agent
instead would have it kill the ranks after its own short timeout, or, with one process, die at once
and take the rank with it mid-checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from lora_launch.launcher.relay import StderrRelay
from lora_launch.run.process import ChildFate, StopSignals, spawn

RANK_MODULE = "lora_launch.train"


@dataclass(frozen=True)
class Outcome:
    """How a supervised launch ended: its exit code and the first stop signal the launcher got."""

    returncode: int
    signum: int | None = None
    killed: bool = False  # a second Ctrl-C ended everything without a checkpoint
    errors: tuple[str, ...] = ()  # the ranks' one-line `error:` messages
    aborted: bool = False  # ended by the launcher: another node's ranks failed (see launcher/restart.py)
    first_exit: tuple[int, int] | None = None  # (local rank, exit code) of the first rank seen to fail


def _is_rank(p) -> bool:
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - psutil.Error: the process is gone or not ours to read
        return False
    return any(a == RANK_MODULE for a in cmd[cmd.index("-m") + 1 :][:1]) if "-m" in cmd else False


def ranks_of(pid: int) -> list:
    """The training processes under `pid` (not their data-loader workers, which look the same)."""
    import psutil

    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = [p for p in below if _is_rank(p)]
    rank_pids = {p.pid for p in ranks}
    out = []
    for p in ranks:
        try:
            if p.ppid() not in rank_pids:
                out.append(p)
        except psutil.Error:
            continue
    return out


def _send(procs, sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except Exception:  # noqa: BLE001 - psutil.NoSuchProcess: already gone
            pass


class Supervisor:
    """One supervised `accelerate launch`; `wait()` returns its Outcome.

    `abort`, polled every second while no stop signal came, ends the launch at once when it returns True.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], abort: Callable[[], bool] | None = None):
        self.cmd, self.env, self.abort = cmd, env, abort
        # a second Ctrl-C: stop now, no checkpoint; after a hangup the terminal's writes go nowhere
        self.stops = StopSignals(self._pass_on, self._kill_all)
        self.killed = False
        self.aborted = False
        self.proc: subprocess.Popen | None = None

    def _pass_on(self, signum: int) -> None:
        """The first stop signal goes to the ranks, which stop after their step with a checkpoint."""
        ranks = ranks_of(self.proc.pid)
        if ranks:
            _send(ranks, signum)
        else:  # training has not started: nothing to save, end the launch
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _kill_all(self) -> None:
        self.killed = True
        self._kill_tree()

    def _kill_tree(self) -> None:
        import psutil

        try:
            below = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            below = []
        _send(below, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> Outcome:
        """Start the launch, pass on stop signals until it ends, then wait for its ranks to be gone."""
        with self.stops:
            self.proc = spawn(self.cmd, fate=ChildFate.KILLED_WITH_PARENT, env=self.env, stderr=subprocess.PIPE)
            relay = StderrRelay(self.proc.stderr, verbose=bool(os.environ.get("LORA_LAUNCH_VERBOSE"))).start()
            ranks = []
            while True:
                try:
                    rc = self.proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    ranks = ranks_of(self.proc.pid) or ranks
                    if self.abort is not None and not self.aborted and not self.stops.requested and self.abort():
                        self.aborted = True  # a peer is gone: nothing here can finish or checkpoint
                        self._kill_tree()
            _wait_gone(ranks, timeout_s=60.0)
            relay.join()
            return Outcome(rc, self.stops.signum, self.killed, tuple(relay.errors), self.aborted, relay.first_exit)


def _wait_gone(procs, timeout_s: float) -> None:
    """Wait until every process in `procs` has exited (ranks may still be writing a checkpoint)."""
    end = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except Exception:  # noqa: BLE001 - gone already, or still there at the deadline
            pass


def supervise(cmd: list[str], env: dict[str, str], abort: Callable[[], bool] | None = None) -> Outcome:
    """Run `cmd` (an accelerate launch) under a Supervisor."""
    return Supervisor(cmd, env, abort).wait()
