"""File system faults for one command, in a private mount namespace (we run as root: chmod stops nothing).

`read_only` runs a command with a directory bind-mounted read-only over itself; `full_disk` runs it with a
small tmpfs mounted on a directory, and copies what the command left there out before the mount goes away.
Both skip the test, saying why, where `unshare -rm` (an unprivileged user and mount namespace) or the mount
does not work here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

_PROBES: dict[str, str | None] = {}


def _probe(kind: str, script: str, scratch: Path, *args: str) -> None:
    """Skip unless `unshare -rm sh -c script` works here (checked once per kind)."""
    if kind not in _PROBES:
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            base = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True, timeout=30)
            probe = (
                base
                if base.returncode
                else subprocess.run(
                    ["unshare", "-rm", "sh", "-c", script, "sh", str(scratch), *args],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            )
        except (OSError, subprocess.SubprocessError) as e:
            _PROBES[kind] = f"unshare -rm cannot run here: {e}"
        else:
            _PROBES[kind] = (
                None
                if probe.returncode == 0
                else f"unshare -rm cannot {kind} here: {(probe.stderr.strip() or f'exit {probe.returncode}')[:200]}"
            )
    if _PROBES[kind]:
        pytest.skip(_PROBES[kind])


_RO = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"'
_TMPFS = 'mount -t tmpfs -o size="$2" tmpfs "$1"'


def read_only(
    directory: Path, argv: list[str], env: dict, cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `argv` with `directory` read-only (a bind mount of itself, remounted ro) and nothing else changed."""
    _probe("bind-mount a directory read-only", _RO + ' && ! touch "$1/.probe" 2>/dev/null', cwd / ".ro-probe")
    script = _RO + ' && shift && exec "$@"'
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(directory), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def full_disk(
    directory: Path, size: str, keep: Path, argv: list[str], env: dict, cwd: Path, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `argv` with a tmpfs of `size` (e.g. "300k") mounted on `directory`; what the command left there
    is copied into `keep` (which must lie outside it) once it exited, since the mount ends with it."""
    _probe("mount a tmpfs", _TMPFS, cwd / ".tmpfs-probe", "64k")
    directory.mkdir(parents=True, exist_ok=True)
    keep.mkdir(parents=True, exist_ok=True)
    script = _TMPFS + ' || exit 97; keep=$3; shift 3; "$@"; rc=$?; cp -a "$0/." "$keep/"; exit $rc'
    # $0 is the mounted directory itself (sh -c's first operand), so the copy still finds it after the shift
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, str(directory), str(directory), size, str(keep), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
