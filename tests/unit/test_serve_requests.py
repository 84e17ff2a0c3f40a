"""`lora-launch serve`'s HTTP API against what clients send, in-process on the bundled tiny model: the Host header,
the key's scheme, parameters it cannot honour, OpenAI's logprobs, and any request body (a property test) answered
without a 500."""

from __future__ import annotations

import importlib.resources
import json
import math
from pathlib import Path

import pytest

TINY = Path(str(importlib.resources.files("lora_launch.conf") / "assets" / "tiny-llama"))
KEY = "sk-unit-0123"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine():
    from lora_launch.serve.adapters import Served
    from lora_launch.serve.engine import load_engine

    engine = load_engine(Served(str(TINY), "tiny-llama", [], {}, None), max_batch=4)
    yield engine
    engine.close()


def _client(engine, api_key=None, hosts=None):
    """The app as `serve` builds it for the tiny model, reached as http://localhost (a loopback name)."""
    from fastapi.testclient import TestClient

    from lora_launch.serve.adapters import Served
    from lora_launch.serve.app import LOOPBACK, Limits, create_app, models_of

    models = models_of(Served(str(TINY), "tiny-llama", [], {}, None), engine, "auto")
    limits = Limits(max_tokens=16, max_prompt_tokens=None, max_body_bytes=20_000, max_concurrent=8)
    return TestClient(create_app(engine, models, limits, api_key, hosts or LOOPBACK), base_url="http://localhost")


@pytest.fixture(scope="module")
def client(engine):
    return _client(engine)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _chat(text: str, **extra) -> dict:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 6,
        "temperature": 0,
    } | extra


# ---- who may ask ---------------------------------------------------------------------------------


def test_only_loopback_and_allowed_host_names_are_answered(engine):
    client = _client(engine, hosts=frozenset({"localhost", "127.0.0.1", "::1", "gpu-box.lan"}))
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "gpu-box.lan:8000"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"):
        error = _error(client.get("/v1/models", headers={"Host": host}), 421)
        assert error["code"] == "invalid_host" and "allowed_hosts=" in error["message"]
        assert _error(client.post(CHAT, json=_chat("Hi"), headers={"Host": host}), 421)
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 200  # says only "ok"
    anyone = _client(engine, hosts=frozenset({"*"}))
    assert anyone.get("/v1/models", headers={"Host": "evil.example"}).status_code == 200


def test_the_bearer_scheme_is_taken_in_any_case(engine):
    client = _client(engine, api_key=KEY)
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert client.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200, scheme
    for header in (f"Basic {KEY}", KEY, f"Bearer {KEY}x", "bearer "):
        assert _error(client.get("/v1/models", headers={"Authorization": header}), 401)["code"] == "invalid_api_key"


# ---- what is asked -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,extra,param",
    [
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        (CHAT, {"functions": [{"name": "f"}]}, "functions"),
        (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
        (
            CHAT,
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
            "response_format",
        ),
        (CHAT, {"n": 2}, "n"),
        ("/v1/completions", {"n": 3}, "n"),
        ("/v1/completions", {"echo": True}, "echo"),
        (CHAT, {"seed": 2**70}, "seed"),
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        (CHAT, {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ],
)
def test_what_this_server_cannot_honour_is_a_400_naming_it(client, path, extra, param):
    body = _chat("Hi") | extra if path == CHAT else {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4} | extra
    assert _error(client.post(path, json=body), 400)["param"] == param


def test_text_response_format_and_a_seed_in_range_are_answered(client):
    out = client.post(CHAT, json=_chat("Hi", response_format={"type": "text"}, temperature=0.7, seed=2**63 - 1))
    assert out.status_code == 200, out.text


def test_a_lone_surrogate_is_a_400_not_a_500(client):
    for path, body in [
        (CHAT, b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        ("/v1/completions", b'{"model": "tiny-llama", "prompt": "\\udfff"}'),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}'),
    ]:
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, response.text
        _error(response, response.status_code)


def test_a_tiny_temperature_decodes_greedily(client):
    greedy = client.post(CHAT, json=_chat("Where is Italy?")).json()["choices"][0]["message"]["content"]
    for temperature in (1e-300, 5e-324, 1e-8):
        out = client.post(CHAT, json=_chat("Where is Italy?", temperature=temperature))
        assert out.status_code == 200, out.text
        assert out.json()["choices"][0]["message"]["content"] == greedy


def test_an_empty_stop_string_is_ignored(client):
    plain = client.post(CHAT, json=_chat("Where is Italy?")).json()["choices"][0]["message"]["content"]
    assert plain
    for stop in ("", [""], ["", "\u2603"]):
        out = client.post(CHAT, json=_chat("Where is Italy?", stop=stop)).json()["choices"][0]
        assert out["message"]["content"] == plain, stop


# ---- logprobs as OpenAI shapes them --------------------------------------------------------------


def test_chat_logprobs_list_each_token_with_its_likeliest_rivals(client):
    # a question the base model answers at some length (to "Hello" it says "." and stops)
    answer = client.post(CHAT, json=_chat("Tell me about Peru.", logprobs=True, top_logprobs=3)).json()
    out, content = answer["choices"][0], answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] > 3
    assert "".join(t["token"] for t in content) == out["message"]["content"]
    for token in content:
        assert set(token) == {"token", "logprob", "bytes", "top_logprobs"}
        assert token["bytes"] == list(token["token"].encode()) and token["logprob"] <= 0
        rivals = [r["logprob"] for r in token["top_logprobs"]]
        assert len(rivals) == 3 and rivals == sorted(rivals, reverse=True)
        assert math.isclose(token["logprob"], rivals[0], abs_tol=1e-5)  # greedy takes the likeliest
        assert sum(math.exp(v) for v in rivals) <= 1 + 1e-5
    plain = client.post(CHAT, json=_chat("Tell me about Peru.", logprobs=True)).json()["choices"][0]
    assert plain["message"] == out["message"] and all(t["top_logprobs"] == [] for t in plain["logprobs"]["content"])
    assert client.post(CHAT, json=_chat("Where is Italy?")).json()["choices"][0]["logprobs"] is None


def test_completion_logprobs_are_the_legacy_parallel_lists(client):
    body = {"model": "tiny-llama", "prompt": "Where is Peru? It is", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    answer = client.post("/v1/completions", json=body).json()
    out, n = answer["choices"][0], answer["usage"]["completion_tokens"]
    lp = out["logprobs"]
    assert "".join(lp["tokens"]) == out["text"] and len(lp["tokens"]) == len(lp["token_logprobs"]) == n > 2
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == logprob == max(top.values()) and len(top) <= 3
    events = [e[6:] for e in client.post("/v1/completions", json=body | {"stream": True}).text.split("\n\n") if e]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert sum((c["logprobs"]["tokens"] for c in chunks), []) == lp["tokens"]
    assert sum((c["logprobs"]["text_offset"] for c in chunks), []) == lp["text_offset"]


# ---- any body: a 400-class answer or a real one, never a 500 -------------------------------------


def test_no_request_body_gets_a_500(client):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from support.serve_bodies import BODY, MISTAKE

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(path=st.sampled_from(["/v1/completions", CHAT]), body=BODY, mistake=MISTAKE)
    def answered_below_500(path, body, mistake):
        body = body | dict([mistake] if mistake else [])
        response = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            _error(response, response.status_code)
        elif response.headers["content-type"].startswith("text/event-stream"):
            events = [e[6:] for e in response.text.split("\n\n") if e]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), response.text
        else:
            assert response.json()["choices"], response.text

    answered_below_500()
