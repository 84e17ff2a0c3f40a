"""`lora-launch serve` as a user meets it: the installed console script started from a temporary directory on the
trials of a real (tiny, 6-step) sweep, real HTTP requests, a load of 64 concurrent requests, SIGTERM under load,
a merged model as the base, `engine=vllm`, and bad start-ups."""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support.cli import CLI, lora_launch, subprocess_env
from support.serve import Server, events_text
from support.terminal import ctrl_c, start_job

KEY = "sk-test-0123456789abcdef"
PROMPTS = [
    "cat dog sun",
    "red blue tree",
    "fish bird moon",
    "star rain leaf",
    "sun red fish",
    "tree moon cat",
    "leaf star dog",
    "bird rain blue",
]


def raw_prompt(words: str) -> str:
    return f"[INST] Reverse: {words} [/INST]"  # the run's template (llama2) written out by hand


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory) -> Path:
    """Two trials of a 6-step sweep of the tiny model, differing in learning rate."""
    root = tmp_path_factory.mktemp("serve")
    done = lora_launch(
        "-m",
        *tiny["overrides"],
        "optim.lr=2e-3,3e-2",
        "train.max_steps=6",
        "eval.every_steps=0",
        f"hydra.sweep.dir={root / 'sweep'}",
        f"data.cache_dir={root / 'cache'}",
        cwd=root,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "sweep"


def trials(sweep: Path) -> list[Path]:
    return sorted(d for d in sweep.iterdir() if (d / "adapter").is_dir())


@pytest.fixture(scope="module")
def server(sweep, tmp_path_factory):
    """Every finished trial of the sweep, an API key from the environment, small limits."""
    srv = Server(
        tmp_path_factory.mktemp("server"),
        f"sweep={sweep}",
        "max_tokens=48",
        "max_body_bytes=20000",
        "max_batch=16",
        "max_concurrent=64",
        key=KEY,
    )
    yield srv
    assert srv.stop() == 0
    assert KEY not in srv.logs()


def test_models_health_and_the_api_key(server, sweep):
    names = [d.name for d in trials(sweep)]
    assert server.request("GET", "/health", key=None) == (200, {"status": "ok"})
    for key in (None, "wrong"):
        status, out = server.request("GET", "/v1/models", key=key)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        status, out = server.request("POST", "/v1/completions", {"model": names[0], "prompt": "x"}, key=key)
        assert status == 401
    status, out = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in out["data"]] == ["model", *names]
    assert {m["parent"] for m in out["data"][1:]} == {"model"}


def test_completions_chat_and_streams_agree_with_generate(server, sweep, tmp_path):
    trial = trials(sweep)[0]
    chat, why = server.complete(trial.name, "Reverse: cat dog sun", chat=True, max_tokens=8)
    assert why in ("stop", "length")
    # the chat prompt is written out with the run's own template, as `lora-launch generate` writes it
    generated = subprocess.run(
        [CLI, "generate", f"run.dir={trial}", "prompt=Reverse: cat dog sun", "max_new_tokens=8"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.rstrip("\n") == raw_prompt("cat dog sun") + chat
    assert server.complete(trial.name, raw_prompt("cat dog sun"), max_tokens=8) == (chat, why)  # raw: as written
    assert server.complete(trial.name, raw_prompt("cat dog sun"), stream=True, max_tokens=8) == (chat, why)
    assert server.complete(trial.name, "Reverse: cat dog sun", chat=True, stream=True, max_tokens=8) == (chat, why)


def test_two_trials_of_a_sweep_answer_differently(server, sweep):
    a, b = (d.name for d in trials(sweep))
    answers = {m: [server.complete(m, raw_prompt(p))[0] for p in PROMPTS[:4]] for m in ("model", a, b)}
    assert answers[a] != answers[b]
    assert answers[a] != answers["model"] and answers[b] != answers["model"]


def test_bad_requests_are_json_errors(server, sweep):
    name = trials(sweep)[0].name
    post = lambda body, **kw: server.request("POST", "/v1/completions", body, **kw)  # noqa: E731
    status, out = post({"model": "no-such-run", "prompt": "x"})
    assert status == 404 and out["error"]["code"] == "model_not_found" and name in out["error"]["message"]
    status, out = post({"model": name, "prompt": "x", "max_tokens": 49})
    assert status == 400 and out["error"]["param"] == "max_tokens"
    status, out = post({"model": name, "prompt": "cat " * 300})  # past the tiny model's 256-token context
    assert status == 400 and out["error"]["code"] == "context_length_exceeded"
    status, out = post({"model": name, "prompt": "x" * 30000})
    assert status == 413 and out["error"]["code"] == "request_too_large"
    status, out = post(None, raw=b'{"model": "' + name.encode() + b'", "prompt": ')
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    status, out = server.request("POST", "/v1/chat/completions", {"model": name, "messages": "hi"})
    assert status == 400 and out["error"]["param"] == "messages"
    assert server.request("GET", "/health")[0] == 200
    assert server.complete(name, raw_prompt("cat dog sun"))[1] in ("stop", "length")


def test_64_concurrent_requests_from_8_clients_answer_as_one_at_a_time(server, sweep):
    models = ["model", *(d.name for d in trials(sweep))]
    combos = [(m, p) for p in PROMPTS for m in models]
    reference, tokens = {}, {}
    start = time.perf_counter()
    for m, p in combos:  # one request at a time: each generated alone
        reference[m, p] = server.complete(m, raw_prompt(p), max_tokens=16)
        tokens[m, p] = server.last_tokens
    one_at_a_time_s = time.perf_counter() - start
    sent = [combos[i % len(combos)] for i in range(64)]

    def client(k: int) -> list[tuple[bool, float]]:  # one client: 8 requests at once, 1 in 4 streamed
        def one(i: int):
            m, p = sent[8 * k + i]
            began = time.perf_counter()
            got = server.complete(m, raw_prompt(p), stream=i % 4 == 0, max_tokens=16)
            return got == reference[m, p], time.perf_counter() - began

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(8)))

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as clients:
        results = [r for rs in clients.map(client, range(8)) for r in rs]
    wall = time.perf_counter() - start
    assert len(results) == 64 and all(ok for ok, _ in results), [ok for ok, _ in results]
    latencies = sorted(s for _, s in results)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    print(
        f"\nserve load: 64 requests from 8 clients (8 at once each, 1 in 4 streamed, up to 16 new tokens, "
        f"3 models mixed): wall {wall:.2f} s, latency p50 {p50 * 1000:.0f} ms p95 {p95 * 1000:.0f} ms, "
        f"{sum(tokens[c] for c in sent) / wall:.0f} tokens/s; the {len(combos)} references one at a time: "
        f"{one_at_a_time_s:.2f} s, {sum(tokens.values()) / one_at_a_time_s:.0f} tokens/s"
    )


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(sweep, tmp_path):
    first, second = trials(sweep)
    # no API key: open; a run dir and a bare adapter dir (named by its run)
    srv = Server(tmp_path, f"run.dir={first}", f"adapters=['{second / 'adapter'}']", "max_batch=4")  # quoted: holds =
    status, out = srv.request("GET", "/v1/models", key=None)
    assert status == 200 and [m["id"] for m in out["data"]] == ["model", first.name, second.name]
    jobs = [((first.name, second.name)[i % 2], PROMPTS[i % 8]) for i in range(48)]
    reference = {job: srv.complete(job[0], raw_prompt(job[1]), max_tokens=40) for job in set(jobs)}
    accepted, outcomes = [], {}

    def one(i: int, job) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps(
                    {"model": job[0], "prompt": raw_prompt(job[1]), "max_tokens": 40, "temperature": 0, "stream": True}
                ),
                {"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            accepted.append(i)
            outcomes[i] = (response.status, events_text(response.read().decode(), chat=False) == reference[job])
        except (ConnectionError, http.client.HTTPException) as e:  # refused or closed before it was taken
            outcomes[i] = ("not accepted", type(e).__name__)

    threads = [threading.Thread(target=one, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(accepted) < 12:
        assert time.time() < deadline, "requests were not taken"
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    taken_before = set(accepted)
    time.sleep(0.5)  # the server has stopped taking connections, and is still answering
    late = [threading.Thread(target=one, args=(100 + i, jobs[i])) for i in range(8)]
    for t in late:
        t.start()
    for t in threads + late:
        t.join(timeout=300)
    assert srv.proc.wait(timeout=120) == 0, srv.err.read_text()[-3000:]
    for i, outcome in outcomes.items():
        if i in accepted:
            assert outcome == (200, True), (i, outcome)  # every request taken was answered in full
        else:
            assert outcome[0] == "not accepted", (i, outcome)
    assert taken_before <= set(accepted) and len(outcomes) == 56
    print(
        f"\nSIGTERM with {len(taken_before)} of 48 requests taken (4 generated at a time): "
        f"{len([i for i in accepted if i < 100])} of 48 answered in full, "
        f"{len([i for i in accepted if i >= 100])} of 8 sent after SIGTERM taken; exit 0"
    )
    assert "stopped:" in srv.out.read_text()


def test_ctrl_c_with_a_stream_in_flight_ends_130_in_one_line(sweep, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the foreground job's group) while a stream is being answered:
    the server drains and says so in one line, exit 130, with no traceback from it or from uvicorn."""
    first, _ = trials(sweep)
    log = tmp_path / "serve.log"
    job = start_job(["serve", "port=0", f"run.dir={first}"], tmp_path, log)
    deadline = time.time() + 240
    while "serving " not in log.read_text():
        assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    port = int(log.read_text().split("http://127.0.0.1:")[1].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"model": first.name, "prompt": raw_prompt(PROMPTS[0]), "max_tokens": 200, "temperature": 1, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # the stream has begun
    ctrl_c(job)
    assert job.wait(timeout=120) == 130, log.read_text()[-3000:]
    response.read()  # whatever the drain sent; the connection ends either way
    text = log.read_text()
    assert text.rstrip().splitlines()[-1] == "stopped (Ctrl-C)", text[-3000:]
    assert "Traceback" not in text and "ERROR" not in text and "error:" not in text, text[-3000:]


def test_a_merged_model_serves_as_the_base(server, sweep, tmp_path):
    trial = trials(sweep)[0]
    merged = tmp_path / "merged"
    done = subprocess.run(
        [CLI, "merge", f"run.dir={trial}", f"out={merged}", "dtype=float32"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    srv = Server(tmp_path, f"base={merged}", "template=llama2")
    try:
        status, out = srv.request("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in out["data"]] == ["merged"]
        for words in PROMPTS[:3]:  # base + adapter merged into one model answers as the adapter does
            assert srv.complete("merged", raw_prompt(words)) == server.complete(trial.name, raw_prompt(words))
            assert srv.complete("merged", f"Reverse: {words}", chat=True) == server.complete(
                trial.name, f"Reverse: {words}", chat=True
            )
    finally:
        assert srv.stop() == 0


def test_engine_vllm_execs_vllm_serve_with_the_same_names(sweep, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"  # stands in for vLLM's command: records how it was called
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\nprintf "%s" "$VLLM_API_KEY" > {tmp_path}/key\n')
    fake.chmod(0o755)
    env = subprocess_env(PATH=f"{bin_dir}:{os.environ['PATH']}", LORA_LAUNCH_API_KEY=KEY)
    done = subprocess.run(
        [CLI, "serve", f"sweep={sweep}", "engine=vllm", "port=8011"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["serve", str(Path(argv[1]))] and Path(argv[1]).name == "model"
    modules = argv[argv.index("--lora-modules") + 1 : argv.index("--lora-modules") + 3]
    assert [json.loads(m)["name"] for m in modules] == [d.name for d in trials(sweep)]
    assert [json.loads(m)["path"] for m in modules] == [str(d / "adapter") for d in trials(sweep)]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8011"
    assert (tmp_path / "key").read_text() == KEY and KEY not in done.stdout + done.stderr + "\n".join(argv)


def test_bad_start_ups_are_one_line_and_exit_2(server, sweep, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"adapters=[{tmp_path / 'empty'}]"], "not a PEFT adapter directory"),
        ([f"run.dir={tmp_path / 'nowhere'}"], "no config.yaml here"),
        ([f"sweep={tmp_path / 'empty'}"], "no finished trial"),
        ([f"sweep={sweep}", "engine=vllm"], "engine=vllm needs the `vllm` command"),
        ([f"sweep={sweep}", f"port={server.port}"], "cannot listen on 127.0.0.1"),
        (["colour=red"], "unknown argument 'colour=red'"),
    ]
    env = subprocess_env(PATH=str(Path(CLI).parent) + ":/usr/bin:/bin")  # no vllm here
    for args, says in cases:
        done = subprocess.run([CLI, "serve", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert done.stderr.startswith("error: ") and says in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, (args, done.stderr)
