"""One live launch per run directory (and node): a lock file naming the host and pid that hold it.

The lock is an flock on `RUN/.launch.lock[.nodeN]`, so a launcher that dies (even by SIGKILL)
releases it and the next launch takes over: that is the stale-lock detection, and it is what a
Slurm requeue relies on. Filesystems without flock fall back to the recorded pid and host: a lock
whose pid is gone on this host is stale; one from another host must be removed by hand.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from lora_launch.conf.schema import ConfigError


def lock_path(run_dir: Path, node_rank: int = 0, num_machines: int = 1) -> Path:
    """The lock file of this node's share of the run (one per node of a multi-node run)."""
    return run_dir / (".launch.lock" if num_machines == 1 else f".launch.lock.node{node_rank}")


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_message(path: Path, holder: dict) -> str:
    return (f"run.dir {path.parent} is in use by a live launch (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, lock {path}); wait for it or choose another run.dir")


class RunLock:
    """Context manager holding the run dir's lock for the life of the launch."""

    def __init__(self, path: Path, wait_s: float = 0.0):
        self.path = path
        self.wait_s = wait_s  # how long a held lock may take to be released before giving up
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (waiting up to wait_s for its holder to end) or raise ConfigError saying who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, said = time.monotonic() + self.wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    self._check_by_pid()  # no flock on this filesystem
                    break
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ConfigError(_held_message(self.path, _holder(self.path))) from None
                if not said:
                    print(f"waiting up to {self.wait_s:.0f} s for the earlier launch holding {self.path} to end",
                          flush=True)
                    said = True
                time.sleep(0.5)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def _check_by_pid(self) -> None:
        holder = _holder(self.path)
        if not holder.get("pid"):
            return
        if holder.get("host") != socket.gethostname() or _pid_alive(int(holder["pid"])):
            raise ConfigError(_held_message(self.path, holder) + " (remove the lock file if that launch is gone)")

    def release(self) -> None:
        """Clear the holder and drop the lock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

