"""A `lora-launch studio` process for the tests, and the headless Chromium they open its page in."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from support.cli import CLI, subprocess_env

BROWSER = "apt-get install -y chromium  (as root; `make browser` or `make test` does it on Debian/Ubuntu)"


class Studio:
    """One `lora-launch studio --port 0` process in `home` and the URL it printed."""

    def __init__(self, home):
        self.proc = subprocess.Popen(
            [CLI, "studio", "--port", "0"],
            cwd=home,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.proc.stdout.readline()
        found = re.search(r"open (http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
        assert found, line + self.proc.stdout.read() if self.proc.poll() is not None else line
        self.base, self.token = found.groups()
        self.url = f"{self.base}/?token={self.token}"

    def call(self, path, body=None, token=True, expect=200):
        headers = {"Content-Type": "application/json"} | ({"X-Studio-Token": self.token} if token else {})
        data = None if body is None else json.dumps(body).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.base + path, data, headers), timeout=300) as r:
                status, out = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            status, out = e.code, json.loads(e.read())
        assert status == expect, (path, status, out)
        return out

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def __enter__(self) -> Studio:
        return self

    def __exit__(self, *_exc) -> None:
        if self.proc.poll() is None:  # a test may have stopped it already
            self.stop()


def chromium() -> str:
    """The installed Chromium's path; the test fails naming how to install one when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail(f"the studio's page tests need a headless Chromium and none is installed: {BROWSER}", pytrace=False)
