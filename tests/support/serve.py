"""A `lora-launch serve` process started as a user starts it, and an HTTP client for it."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import time
from pathlib import Path

from support.cli import CLI, subprocess_env


class Server:
    """A `lora-launch serve` process and an HTTP client for it."""

    def __init__(self, cwd: Path, *args: str, key: str | None = None):
        env = subprocess_env()
        env.pop("LORA_LAUNCH_API_KEY", None)
        if key:
            env["LORA_LAUNCH_API_KEY"] = key
        self.key, self.out, self.err = key, cwd / "serve.out", cwd / "serve.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:  # files: a pipe left unread would block it
            self.proc = subprocess.Popen([CLI, "serve", "port=0", *args], cwd=cwd, env=env, stdout=out, stderr=err)
        deadline = time.time() + 240
        while "serving " not in self.out.read_text():
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.err.read_text()[-3000:]}"
            assert time.time() < deadline, "serve did not start in 240 s"
            time.sleep(0.2)
        line = next(line for line in self.out.read_text().splitlines() if line.startswith("serving "))
        self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])

    def request(self, method: str, path: str, body=None, key: str | None = "own", raw: bytes | None = None):
        """(status, parsed JSON or the text of an event stream)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        headers = {"Content-Type": "application/json"}
        key = self.key if key == "own" else key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(
            method, path, raw if raw is not None else (json.dumps(body) if body is not None else None), headers
        )
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        if response.getheader("content-type", "").startswith("text/event-stream"):
            return response.status, text
        return response.status, json.loads(text)

    def complete(self, model: str, prompt: str, chat: bool = False, stream: bool = False, max_tokens: int = 12):
        """The greedy answer's text, and the finish reason."""
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        status, out = self.request("POST", "/v1/chat/completions" if chat else "/v1/completions", body)
        assert status == 200, out
        if not stream:
            self.last_tokens = out["usage"]["completion_tokens"]
            choice = out["choices"][0]
            return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]
        return events_text(out, chat)

    def logs(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def events_text(stream: str, chat: bool) -> tuple[str, str]:
    """The text and finish reason a server-sent event stream carries; it must end with [DONE]."""
    events = [e[len("data: ") :] for e in stream.split("\n\n") if e]
    assert events and events[-1] == "[DONE]", stream[-500:]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    text = "".join(c["delta"].get("content", "") if chat else c["text"] for c in chunks)
    return text, chunks[-1]["finish_reason"]
