"""One live run per run directory (and node), for as long as any of its processes lives.

Two flock files per node of a run:
  RUN/.launch.lock[.nodeN]  exclusive: held by the `lora-launch` of that node for its whole life, or,
                            when training is started directly (`accelerate launch -m lora_launch.train`),
                            by that node's local rank 0. It names its holder's pid and host.
  RUN/.ranks.lock[.nodeN]   shared: held by every training process of the run.
A launch takes the first and then checks that nobody holds the second, so it is refused while the
launcher of another run lives and also while ranks of an earlier launch live on (a launcher killed
with SIGKILL: its ranks checkpoint and end on their own). flock locks vanish with their process,
even on SIGKILL: that is the stale-lock detection a Slurm requeue relies on. Filesystems without
flock fall back to the recorded pid and host.
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

_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _suffix(node_rank: int, num_machines: int) -> str:
    return "" if num_machines == 1 else f".node{node_rank}"


def lock_path(run_dir: Path, node_rank: int = 0, num_machines: int = 1) -> Path:
    """The launch lock of this node's share of the run."""
    return Path(run_dir) / (".launch.lock" + _suffix(node_rank, num_machines))


def ranks_lock_path(run_dir: Path, node_rank: int = 0, num_machines: int = 1) -> Path:
    """The lock every training process of this node holds (shared)."""
    return Path(run_dir) / (".ranks.lock" + _suffix(node_rank, num_machines))


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def holder(run_dir: Path, node_rank: int = 0, num_machines: int = 1) -> dict:
    """Who holds this node's launch lock ({pid, host, since}), as its holder wrote it."""
    return _holder(lock_path(run_dir, node_rank, num_machines))


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on `path`, from /proc/locks (Linux; [] where unknown)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    inode = f":{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(inode):
            pids.append(int(parts[4]))
    return sorted(set(pids))


def in_use(run_dir: Path) -> bool:
    """Whether a live launch holds one of `run_dir`'s launch locks (by flock; by the recorded pid without it)."""
    for path in Path(run_dir).glob(".launch.lock*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _holder(path).get("pid")
            if e.errno in _BUSY or (pid and pid != os.getpid() and pid_alive(int(pid))):
                return True
        finally:
            os.close(fd)
    return False


def _held_message(path: Path, holder: dict) -> str:
    return (
        f"run.dir {path.parent} is in use by a live launch (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, lock {path}); wait for it or choose another run.dir"
    )


def _flock(fd: int, mode: int, wait_s: float, path: Path, waiting: str) -> bool | None:
    """flock(fd, mode) waiting up to wait_s: True once taken, False if still busy, None without flock here."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in _BUSY:
                return None  # this filesystem has no flock: callers fall back to the recorded pid
            if time.monotonic() >= deadline:
                return False
            if not said:
                print(f"waiting up to {wait_s:.0f} s for {waiting} ({path}) to end", flush=True)
                said = True
            time.sleep(0.5)


class RunLock:
    """The launch lock, held for the life of the launch (a context manager)."""

    def __init__(self, path: Path, wait_s: float = 0.0):
        self.path = Path(path)
        self.wait_s = wait_s  # how long a held lock may take to be released before giving up
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (waiting up to wait_s for its holder to end) or raise ConfigError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        taken = _flock(fd, fcntl.LOCK_EX, self.wait_s, self.path, "the earlier launch holding the run dir")
        if taken is False:
            os.close(fd)
            raise ConfigError(_held_message(self.path, _holder(self.path)))
        if taken is None:
            try:
                self._check_by_pid()
            except ConfigError:
                os.close(fd)
                raise
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def _check_by_pid(self) -> None:
        """Without flock: a holder recorded on this host must be gone; one on another host, removed by hand."""
        holder = _holder(self.path)
        pid = holder.get("pid")
        if not pid or pid == os.getpid():
            return
        if holder.get("host") != socket.gethostname():
            raise ConfigError(_held_message(self.path, holder) + " (remove the lock file if that launch is gone)")
        if pid_alive(int(pid)):
            raise ConfigError(_held_message(self.path, holder))

    def release(self) -> None:
        """Clear the holder and drop the lock."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_no_ranks(path: Path, wait_s: float = 0.0) -> None:
    """Refuse (ConfigError) while training processes of an earlier launch hold `path` (the ranks lock)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _flock(fd, fcntl.LOCK_EX, wait_s, path, "training processes of an earlier launch") is False:
            pids = lock_holders(path)
            who = f"pids {', '.join(map(str, pids))}" if pids else "their pids unknown"
            raise ConfigError(
                f"run.dir {path.parent} is in use: training processes of an earlier launch are still "
                f"running ({who}, lock {path}); wait for them to checkpoint and end, or choose "
                "another run.dir"
            )
    finally:
        os.close(fd)


class RanksLock:
    """The shared lock a training process holds for its whole life (never released by hand)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> RanksLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # shared: every rank of the run holds it at once; a launcher's exclusive probe fails meanwhile
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError:
            pass  # no flock on this filesystem: the launch lock's pid check is all there is
        return self
