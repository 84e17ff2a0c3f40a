"""`lora-launch serve` against what reaches it from outside, as a real process on the bundled tiny model: a Host header
it does not answer to (DNS rebinding), a key in the query string, the `bearer` scheme in lowercase, the official
`openai` client asking for logprobs and tools, a huge prompt beside /health, a client that stalls mid-body at
SIGTERM, and no key on every interface."""

from __future__ import annotations

import http.client
import importlib.resources
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest

from support.cli import CLI, subprocess_env
from support.serve import Server

TINY = Path(str(importlib.resources.files("lora_launch.conf") / "assets" / "tiny-llama"))
KEY = "sk-bad-inputs-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model as the base, a key, one more Host name allowed, room for a ~1 MB body."""
    srv = Server(
        tmp_path_factory.mktemp("serve"),
        f"base={TINY}",
        "allowed_hosts=[models.lan]",
        "max_body_bytes=2000000",
        key=KEY,
    )
    yield srv
    assert srv.stop() == 0


def _get(port: int, path: str, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    return status, body


def test_only_this_machines_names_are_answered(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"models.lan:{server.port}"):
        assert _get(server.port, "/v1/models", {"Host": host} | auth)[0] == 200, host
    status, body = _get(server.port, "/v1/models", {"Host": "evil.example"} | auth)  # a rebound DNS name
    assert status == 421 and body["error"]["code"] == "invalid_host" and "allowed_hosts=" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_bearer_in_any_case_and_no_query_string_in_the_log(server):
    for scheme in ("bearer", "BEARER"):
        assert _get(server.port, "/v1/models", {"Authorization": f"{scheme} {KEY}"})[0] == 200
    secret = "sk-in-the-url-5f3a9c"
    assert _get(server.port, f"/v1/models?api_key={secret}", {"Authorization": f"Bearer {KEY}"})[0] == 200
    deadline = time.time() + 10
    while "GET /v1/models HTTP/1.1" not in server.logs():  # the access log is on, and has the request
        assert time.time() < deadline, server.logs()[-2000:]
        time.sleep(0.1)
    assert secret not in server.logs() and KEY not in server.logs()


def test_the_openai_client_gets_logprobs_and_a_400_for_tools(server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0)
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = chat.choices[0]
    assert choice.logprobs is not None and len(choice.logprobs.content) == chat.usage.completion_tokens > 0
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(
        len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        for t in choice.logprobs.content
    )
    streamed = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        stream=True,
    )
    tokens = [t.token for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert "".join(tokens) == choice.message.content
    text = client.completions.create(
        model="tiny-llama", prompt="Where is Peru? It is", max_tokens=5, temperature=0, logprobs=2
    ).choices[0]
    assert "".join(text.logprobs.tokens) == text.text and len(text.logprobs.token_logprobs) == len(text.logprobs.tokens)
    for kwargs, param in [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], **kwargs)
        assert refused.value.param == param


def test_health_answers_while_a_huge_prompt_is_tokenised(server):
    prompt = " ".join(["cat", "dog", "sun", "tree", "Where", "is", "Italy?"] * 30000)[:1_000_000]
    answer = {}

    def huge():
        answer["status"], answer["body"] = server.request(
            "POST", "/v1/completions", {"model": "tiny-llama", "prompt": prompt}
        )

    thread = threading.Thread(target=huge)
    thread.start()
    waits = []
    while thread.is_alive():
        start = time.time()
        assert server.request("GET", "/health", key=None) == (200, {"status": "ok"})
        waits.append(time.time() - start)
    assert answer["status"] == 400 and answer["body"]["error"]["code"] == "context_length_exceeded"
    assert len(waits) >= 5 and max(waits) < 0.3, waits  # tokenising takes ~0.9 s: /health did not wait for it


def test_sigterm_ends_serve_while_a_client_stalls_mid_body(tmp_path):
    srv = Server(tmp_path, f"base={TINY}")
    stalled = socket.create_connection(("127.0.0.1", srv.port))
    stalled.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"model": "ti'
    )  # 14 of 100 bytes, then nothing
    time.sleep(0.5)
    start = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0, srv.err.read_text()[-2000:]
    assert time.time() - start < 10  # the body read gives up after 5 s without a byte
    stalled.settimeout(5)
    assert stalled.recv(4096).startswith(b"HTTP/1.1 408")
    stalled.close()


def test_no_key_on_every_interface_is_refused_unless_asked(tmp_path):
    env = subprocess_env()
    env.pop("LORA_LAUNCH_API_KEY", None)
    done = subprocess.run(
        [CLI, "serve", f"base={TINY}", "host=0.0.0.0", "port=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "allow_no_key=true" in done.stderr and "serving" not in done.stdout
    srv = subprocess.Popen(
        [CLI, "serve", f"base={TINY}", "host=0.0.0.0", "port=0", "allow_no_key=true"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert any(line.startswith("serving ") for line in iter(srv.stdout.readline, "")), srv.stderr.read()
    finally:
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(timeout=60) == 0
    assert "warning: listening on 0.0.0.0 without an API key" in srv.stderr.read()
