"""The studio's API against bodies a page never sends: malformed or mistyped JSON, bodies past the limit, values
sized to burn CPU, run dirs that would take the studio's own files, and requests under a foreign Host name; each
refused with a JSON `{"error": LINE}` naming what is wrong. In process, over starlette's TestClient."""

from __future__ import annotations

import asyncio
import json

import pytest

from lora_launch.studio import form as forms
from lora_launch.studio.app import MAX_BODY, create_app
from lora_launch.studio.paths import Places

TOKEN = "t0ken"
URL = "http://127.0.0.1:8765"  # as `lora-launch studio` prints it


@pytest.fixture
def root(tmp_path):
    """A studio root holding a user's files and the studio's own state."""
    root = tmp_path / "home"
    (root / "data").mkdir(parents=True)
    (root / "notes.txt").write_text("mine\n")
    (root / "data" / "d.jsonl").write_text('{"text": "hi"}\n')
    (root / ".studio" / "old-run").mkdir(parents=True)
    (root / ".studio" / "old-run" / "launch.log").write_text("$ lora-launch\n")
    return root


def _client(places, **kwargs):
    from fastapi.testclient import TestClient

    return TestClient(create_app(TOKEN, places, 8765), base_url=URL, headers={"X-Studio-Token": TOKEN}, **kwargs)


@pytest.fixture
def client(root):
    return _client(Places(root))


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    return body["error"]


@pytest.mark.parametrize(
    "path,body,named",
    [
        ("/api/validate", b"{not json", "the request body is not valid JSON"),
        ("/api/validate", b"[1, 2]", "send a JSON object"),
        ("/api/validate", {"groups": ["lora"]}, "groups: Input should be a valid dictionary"),
        ("/api/validate", {"values": {"lora.r": ["8"]}}, 'values["lora.r"]: Input should be a valid string'),
        ("/api/validate", {"value": {"lora.r": "8"}}, "value: Extra inputs are not permitted"),
        ("/api/data", {"records": "many"}, "records: Input should be a valid integer"),
        ("/api/stop", {}, "dir: Field required"),
        ("/api/ask", {"dir": "runs/x", "prompt": "hi", "max_tokens": "lots"}, "max_tokens: Input should be"),
    ],
)
def test_a_malformed_body_is_a_400_naming_what_is_wrong(client, path, body, named):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert named in _error(response, 400)


def test_an_unknown_route_is_a_json_404(client):
    assert _error(client.get("/api/nothing"), 404) == "Not Found"


def test_a_body_over_the_limit_is_a_413(client):
    big = json.dumps({"values": {"sample.prompt": "x" * MAX_BODY}}).encode()
    response = client.post("/api/validate", content=big, headers={"Content-Type": "application/json"})
    assert "larger than the studio takes (1048576 bytes)" in _error(response, 413)


def test_a_chunked_body_is_cut_off_at_the_limit_not_read_to_its_end(root):
    """A body without Content-Length that never ends: the studio stops reading just past the limit."""
    app, chunk, pulled, sent = create_app(TOKEN, Places(root), 8765), b"x" * 65536, [], []

    async def receive():
        pulled.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/validate",
        "raw_path": b"/api/validate",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8765"),
            (b"x-studio-token", TOKEN.encode()),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8765),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert "larger than the studio takes" in json.loads(sent[1]["body"])["error"]
    assert sum(pulled) == MAX_BODY + len(chunk)  # one chunk past the limit, then no more


def test_a_20000_entry_list_is_refused_naming_the_key(client):
    huge = json.dumps([f"proj_{i}" for i in range(20_000)])
    line = _error(client.post("/api/validate", json={"values": {"lora.target_modules": huge}}), 400)
    assert line.startswith("lora.target_modules: ") and "at most" in line


def test_list_entries_values_and_text_are_bounded_naming_the_key(client):
    def refused(values):
        return _error(client.post("/api/validate", json={"values": values}), 400)

    assert refused({"lora.target_modules": json.dumps([1] * 257)}).startswith(
        "lora.target_modules: more than 256 entries"
    )
    assert refused({"data.sources": json.dumps([{"path": [["a"]] * 200}])}).startswith(
        "data.sources: more than 256 entries"
    )  # nested entries count
    deep = "[" * 5000 + "]" * 5000
    assert refused({"resume.allow_changes": deep}).startswith("resume.allow_changes: nested too deep")
    assert refused({"sample.prompt": "a" * (forms.MAX_TEXT + 1)}).startswith("sample.prompt: 16385 characters")
    assert "a form sends at most 256" in refused({f"k{i}": "1" for i in range(300)})
    assert "a form sends at most 65536" in refused(
        {
            k: "a" * forms.MAX_TEXT
            for k in ("sample.prompt", "data.system_prompt", "logging.run_name", "model.name", "data.path")
        }
    )
    modules = [f"layers.{i}.q_proj" for i in range(256)]
    ok = client.post("/api/validate", json={"values": {"lora.target_modules": json.dumps(modules)}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["values"]["lora.target_modules"] == modules


def test_a_resumed_command_with_a_huge_override_is_refused_before_parsing():
    """Resume reads a run's recorded command; an override no form could send is refused by its length."""
    with pytest.raises(forms.ConfigError, match=r"^lora\.target_modules: the override is \d+ characters"):
        forms.check_override("lora.target_modules=[" + ",".join(["q_proj"] * 20_000) + "]")


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("run_dir", [".", "ROOT", "ROOT/", "./data/..", "other", ".studio/old-run", "PARENT"])
def test_a_run_dir_holding_the_studios_own_files_is_refused(root, run_dir):
    (root / "other" / ".studio").mkdir(parents=True)  # another studio's root, inside this one's
    client = _client(Places(root, [root.parent]))  # the parent may be named, as with --allow-path
    given = run_dir.replace("ROOT", str(root)).replace("PARENT", str(root.parent))
    before = _files(root)
    for path in ("/api/validate", "/api/launch"):
        response = client.post(path, json={"values": {"run.dir": given, "resume.mode": "never"}})
        assert _error(response, 400).startswith(f"run.dir={given}: ")
    assert _files(root) == before
    assert not (root / "runs").exists()


def test_a_foreign_host_name_is_refused_and_loopback_names_answer(root):
    from fastapi.testclient import TestClient

    places, headers = Places(root), {"X-Studio-Token": TOKEN}
    for host in ("attacker.example", "attacker.example:8765", "127.0.0.1.nip.io:8765"):
        refused = TestClient(create_app(TOKEN, places, 8765)).get("/api/runs", headers={**headers, "Host": host})
        assert _error(refused, 403).startswith(f"Host {host.removesuffix(':8765')}: this studio answers at")
    for host in ("127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765"):
        answered = TestClient(create_app(TOKEN, places, 8765)).get("/api/runs", headers={**headers, "Host": host})
        assert answered.status_code == 200, (host, answered.text)
    anywhere = TestClient(create_app(TOKEN, places, 8765, hosts=None)).get("/api/runs", headers=headers)
    assert anywhere.status_code == 200  # started on another address: the token alone guards it


def test_an_upload_takes_up_to_its_own_limit_and_other_routes_keep_theirs(client, root, monkeypatch):
    import lora_launch.studio.app as studio_app

    monkeypatch.setattr(studio_app, "MAX_UPLOAD", 4096)
    rows = b'{"text": "hi"}\n' * 200  # 3000 bytes: past no limit of the upload, past none of a form
    got = client.post("/api/upload?name=notes.jsonl", content=rows)
    assert got.status_code == 200 and got.json() == {"path": "data/notes.jsonl"}
    assert (root / "data" / "notes.jsonl").read_bytes() == rows
    assert "larger than the studio takes (4096 bytes)" in _error(
        client.post("/api/upload?name=big.jsonl", content=rows * 2), 413
    )
    assert _error(client.post("/api/upload?name=bad.jsonl", content=b"[1]\n"), 400).startswith(
        "upload: bad.jsonl:1: expected a JSON object per line"
    )
    assert client.get("/api/files").json() == {"files": ["data/d.jsonl", "data/notes.jsonl"]}
    assert not (root / "data" / "big.jsonl").exists() and not (root / "data" / "bad.jsonl").exists()
