"""Free TCP ports on the loopback interface for the processes a test starts."""

from __future__ import annotations

import socket


def free_port(span: int = 1) -> int:
    """A free port with the next `span - 1` free too (a launch across nodes restarts at port + attempt)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65536 and all(_free(port + i) for i in range(1, span)):
            return port
    raise AssertionError("no run of free ports found")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
