"""The launch's stderr as a user should see it: the ranks' own lines, without the launcher tracebacks
that `accelerate launch` and torchrun print after a rank exits non-zero.

A rank that refuses bad input prints one `error: ...` line and exits 2; accelerate then raises
CalledProcessError (one process) or torchrun prints ChildFailedError with a boxed report, 15 to 40
lines that say nothing the rank did not; when Slurm signals every process of a job step, torchrun's
agent raises SignalException. Those blocks are dropped here; a rank's own traceback (a real bug) passes
through. LORA_LAUNCH_VERBOSE=1 passes everything. On the way, the relay notes which rank failed first
and its exit code (torchrun's log line, or accelerate's for one process): a negative code is a rank
killed by a signal, which could not say so itself (launcher/restart.py).
"""

from __future__ import annotations

import re
import sys
import threading

_LAUNCHER_FRAMES = ("accelerate/commands/launch.py", "torch/distributed/run.py", "torch/distributed/launcher/",
                    "torch/distributed/elastic/")
_ELASTIC_LOG = re.compile(r"^[EWI]\d{4} [\d:.]+ \d+ \S*torch/distributed/")  # torchrun's own log lines
# how a launch's first failed process ended: torchrun's log line, or accelerate's one-process launcher
_TORCHRUN_FAILED = re.compile(r"\bfailed \(exitcode: (-?\d+)\) local_rank: (\d+)")
_DIED_BY_SIGNAL = re.compile(r"died with <Signals\.\w+: (\d+)>")
_BOX = "=" * 60
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torch prefixes an uncaught exception's lines in a rank


class StderrRelay:
    """Reads the launch's stderr pipe in a thread and writes what the user should see to `out`."""

    def __init__(self, pipe, out=None, verbose: bool = False):
        self.pipe, self.out, self.verbose = pipe, out or sys.stderr, verbose
        self.errors: list[str] = []  # the ranks' one-line `error:` messages, as relayed
        self.first_exit: tuple[int, int] | None = None  # (local rank, exit code) of the first process that failed
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "StderrRelay":
        self._thread.start()
        return self

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)

    def _emit(self, lines: list[str]) -> None:
        try:
            self.out.write("".join(lines))
            self.out.flush()
        except (OSError, ValueError):  # the terminal is gone (SIGHUP): keep draining the pipe
            pass

    def _run(self) -> None:
        block: list[str] = []  # a traceback being read, not yet known to be the launcher's
        skipping_box = 0
        for raw in iter(self.pipe.readline, b""):
            line = raw.decode(errors="replace")
            self._note_exit(line)
            if self.verbose:
                self._emit([line])
                continue
            body = _RANK_PREFIX.sub("", line)
            if skipping_box:  # torchrun's ChildFailedError report, between two rules of '='
                skipping_box -= body.startswith(_BOX)
                continue
            if block:
                block.append(line)
                if body[:1] not in (" ", "\t", "\n") and not body.startswith("Traceback"):
                    # after a rank's one-line error, the other ranks' tracebacks (their peer is gone) are noise
                    if not self.errors and not _is_launcher_traceback(block):
                        self._emit(block)
                    elif "ChildFailedError" in body:
                        skipping_box = 2
                    block = []
                continue
            if body.startswith("Traceback (most recent call last):"):
                block = [line]
            elif _ELASTIC_LOG.match(line):
                continue
            else:
                if line.startswith("error: "):
                    self.errors.append(line.strip())
                self._emit([line])
        if block:
            self._emit(block)

    def _note_exit(self, line: str) -> None:
        if self.first_exit is not None:
            return
        if m := _TORCHRUN_FAILED.search(line):
            self.first_exit = (int(m.group(2)), int(m.group(1)))
        elif m := _DIED_BY_SIGNAL.search(line):  # subprocess.CalledProcessError of the one rank
            self.first_exit = (0, -int(m.group(1)))


def _is_launcher_traceback(block: list[str]) -> bool:
    frames = [l for l in block if l.lstrip().startswith('File "')]
    return bool(frames) and any(f in frames[0] or f in frames[-1] for f in _LAUNCHER_FRAMES) and any(
        kind in block[-1] for kind in ("CalledProcessError", "ChildFailedError", "SignalException"))
