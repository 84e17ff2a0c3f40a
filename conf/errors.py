"""Errors a user causes and can fix, and how they end a command: one `error: ...` line on stderr and exit
status 2, never a traceback (as click's ClickException does).

Every package raises a subclass that says where the fault lies (ConfigError, DataError, CheckpointError, ...)
with a one-line message naming what to change. The main function of each process the CLI runs (`lora-launch`
and its subcommands, the ranks, generate/merge/eval, serve, the studio, a Slurm node) is wrapped in
`reports_user_errors`, the one place that prints them. The HTTP servers answer theirs as a 4xx instead
(serve's ApiError, the studio's Refused).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

PREFIX = "error: "  # how the line starts: the launcher and the studio find a child's error by it
EXIT_STATUS = 2


class UserError(Exception):
    """Something the user gave (a key or value, data, a checkpoint, a run dir, a request) that cannot be used;
    the message is one line naming it and, where it can, what to do instead."""


def say_error(message: str) -> None:
    """The one `error: ...` line on stderr (nothing when the terminal is gone: SIGHUP)."""
    try:
        print(f"{PREFIX}{message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def reports_user_errors(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """`main` (returning its exit status) with a UserError ending it as one `error:` line and status 2."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            say_error(str(e))
            return EXIT_STATUS

    return run
