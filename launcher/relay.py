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

from lora_launch.conf.errors import PREFIX

_LAUNCHER_FRAMES = (
    "accelerate/commands/launch.py",
    "torch/distributed/run.py",
    "torch/distributed/launcher/",
    "torch/distributed/elastic/",
)
_ELASTIC_LOG = re.compile(r"^[EWI]\d{4} [\d:.]+ \d+ \S*torch/distributed/")  # torchrun's own log lines
# how a launch's first failed process ended: torchrun's log line, or accelerate's one-process launcher
_TORCHRUN_FAILED = re.compile(r"\bfailed \(exitcode: (-?\d+)\) local_rank: (\d+)")
_DIED_BY_SIGNAL = re.compile(r"died with <Signals\.\w+: (\d+)>")
_BOX = "=" * 60
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torch prefixes an uncaught exception's lines in a rank
# an exception line with no traceback above it: accelerate >= 1.16 raises CalledProcessError from a
# RuntimeError made of the rank's last stderr line, which Python prints bare, then "The above exception ..."
_BARE_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")


class StderrRelay:
    """Reads the launch's stderr pipe in a thread and writes what the user should see to `out`."""

    def __init__(self, pipe, out=None, verbose: bool = False):
        self.pipe, self.out, self.verbose = pipe, out or sys.stderr, verbose
        self.errors: list[str] = []  # the ranks' one-line `error:` messages, as relayed
        self.first_exit: tuple[int, int] | None = None  # (local rank, exit code) of the first process that failed
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StderrRelay:
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
        ended = False  # the block has its exception line; a chained exception may still follow
        held: list[str] = []  # a bare exception line (and blank lines): the start of a chain, or just a line
        skipping_box = 0
        for raw in iter(self.pipe.readline, b""):
            line = raw.decode(errors="replace")
            self._note_exit(line)
            if self.verbose:  # shows everything, and still notes a refusal: it decides against a restart
                if line.startswith(PREFIX):
                    self.errors.append(line.strip())
                self._emit([line])
                continue
            body = _RANK_PREFIX.sub("", line)
            if block:
                if not ended or body.startswith(_CHAINED) or not body.strip():
                    block.append(line)
                    if body.strip():  # an exception line ends it, unless a chained exception follows
                        ended = body[:1] not in (" ", "\t") and not body.startswith(("Traceback", *_CHAINED))
                    continue
                skipping_box = self._end(block)
                block, ended = [], False
            if skipping_box:  # torchrun's ChildFailedError report, between two rules of '='
                skipping_box -= body.startswith(_BOX)
                continue
            if held:
                if not body.strip():
                    held.append(line)
                    continue
                if body.startswith(_CHAINED):  # the bare line was the cause of the traceback that follows
                    block, ended, held = held + [line], False, []
                    continue
                self._plain(held)
                held = []
            if body.startswith("Traceback (most recent call last):"):
                block = [line]
            elif _ELASTIC_LOG.match(line):
                continue
            elif _BARE_EXCEPTION.match(body):
                held = [line]
            else:
                self._plain([line])
        if block:
            self._end(block)
        self._plain(held)

    def _plain(self, lines: list[str]) -> None:
        """Lines outside any traceback: each shown, but only the first `error:` line of the ranks."""
        for line in lines:
            if line.startswith(PREFIX):
                self.errors.append(line.strip())
                if len(self.errors) > 1:  # every rank's copy of one refusal, or a peer's failure after it
                    continue
            self._emit([line])

    def _end(self, block: list[str]) -> int:
        """Emit a whole traceback (chained ones included) unless it is noise; 2 when torchrun's box follows."""
        # after a rank's one-line error, the other ranks' tracebacks (their peer is gone) are noise
        if not self.errors and not _is_launcher_traceback(block):
            self._emit(block)
            return 0
        return 2 if any("ChildFailedError" in line for line in block[-3:]) else 0

    def _note_exit(self, line: str) -> None:
        if self.first_exit is not None:
            return
        if m := _TORCHRUN_FAILED.search(line):
            self.first_exit = (int(m.group(2)), int(m.group(1)))
        elif m := _DIED_BY_SIGNAL.search(line):  # subprocess.CalledProcessError of the one rank
            self.first_exit = (0, -int(m.group(1)))


def _is_launcher_traceback(block: list[str]) -> bool:
    frames = [line for line in block if line.lstrip().startswith('File "')]
    last = next((line for line in reversed(block) if line.strip()), "")  # the exception line (blank lines may follow)
    return (
        bool(frames)
        and any(f in frames[0] or f in frames[-1] for f in _LAUNCHER_FRAMES)
        and any(kind in last for kind in ("CalledProcessError", "ChildFailedError", "SignalException"))
    )
