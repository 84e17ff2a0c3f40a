"""`lora-launch serve` in pieces: what a run/sweep/adapter dir serves and under which names, the `vllm serve` command,
the HTTP API's checks (auth, limits, errors in OpenAI's shape) against a stand-in engine, and the real engine's
mixed-adapter batches on the bundled tiny model."""

from __future__ import annotations

import asyncio
import importlib.resources
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lora_launch.conf.args import parse_args, usage
from lora_launch.conf.compose import compose
from lora_launch.conf.errors import UserError
from lora_launch.conf.schema import ConfigError
from lora_launch.run.rundir import write_config, write_json
from lora_launch.serve import adapters as served_from
from lora_launch.serve.adapters import Adapter, Served, resolve, vllm_command

TINY = Path(str(importlib.resources.files("lora_launch.conf") / "assets" / "tiny-llama"))


def _adapter_dir(path: Path, r: int = 8) -> Path:
    """An adapter dir as resolve() sees it (config and a weights file; nothing loads them here)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"r": r, "base_model_name_or_path": str(TINY), "peft_type": "LORA"})
    )
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def _run(path: Path, *overrides: str, state: str = "finished", r: int = 8) -> Path:
    write_config(compose([f"run.dir='{path}'", *overrides]), path)
    _adapter_dir(path / "adapter", r)
    write_json(path / "status.json", {"state": state, "step": 4})
    return path


def _args(*argv: str):
    return parse_args("serve", list(argv))


# ---- what is served, under which names ------------------------------------------------------------


def test_runs_sweeps_and_adapter_dirs_are_named_by_their_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run(sweep / "optim.lr=0.001", r=4)
    _run(sweep / "optim.lr=0.01", r=16)
    _run(sweep / "optim.lr=0.1", state="failed")
    run = _run(tmp_path / "mine")
    step = _adapter_dir(run / "checkpoints" / "step-2")
    other = _adapter_dir(tmp_path / "elsewhere" / "sql-lora")
    served = resolve(_args(f"sweep={sweep}", f"run.dir={run}", f"adapters=[{step},{other}]"))
    assert [a.name for a in served.adapters] == ["mine", "optim.lr=0.001", "optim.lr=0.01", "mine-step-2", "sql-lora"]
    assert served.base == str(TINY) and served.base_name == "tiny-llama"
    assert [a.run for a in served.adapters] == [run, sweep / "optim.lr=0.001", sweep / "optim.lr=0.01", run, None]
    assert served.base_cfg.model.path == str(TINY)
    assert "leaving out trial optim.lr=0.1 (failed)" in capsys.readouterr().err


def test_a_merged_model_serves_alone_as_the_base(tmp_path):
    merged = tmp_path / "run" / "merged"
    merged.mkdir(parents=True)
    served = resolve(_args(f"base={merged}"))
    assert (served.base, served.base_name, served.adapters, served.base_cfg) == (str(merged), "merged", [], None)


@pytest.mark.parametrize(
    "make,argv,says",
    [
        (lambda t: t.mkdir(), lambda t: [f"run.dir={t}"], "no config.yaml here"),
        (
            lambda t: _adapter_dir(t).joinpath("adapter_config.json").write_text("{oops"),
            lambda t: [f"adapters=[{t}]"],
            "not a PEFT adapter directory",
        ),
        (
            lambda t: _adapter_dir(t).joinpath("adapter_model.safetensors").unlink(),
            lambda t: [f"adapters=[{t}]"],
            "no adapter_model.safetensors",
        ),
        (
            lambda t: _adapter_dir(t).joinpath("adapter_config.json").write_text('{"r": 8, "use_dora": true}'),
            lambda t: [f"adapters=[{t}]", "base=x"],
            "a DoRA adapter",
        ),
        (lambda t: t.mkdir(), lambda t: [f"sweep={t}"], "no finished trial"),
        (lambda t: None, lambda t: [f"sweep={t}"], "not a directory"),
        (lambda t: None, lambda t: [], "give run.dir=RUN"),
        (
            lambda t: (_run(t / "a"), _run(t / "b", "quant=nf4")),
            lambda t: [f"runs=[{t / 'a'},{t / 'b'}]"],
            "trained on different bases",
        ),
        (
            lambda t: (_run(t / "x" / "same"), _run(t / "y" / "same")),
            lambda t: [f"runs=[{t / 'x/same'},{t / 'y/same'}]"],
            "two models are named 'same'",
        ),
        (lambda t: None, lambda t: ["port=70000"], "port=70000"),
        (lambda t: None, lambda t: ["max_batch=0"], "max_batch=0"),
    ],
)
def test_bad_directories_and_limits_are_one_line_errors(tmp_path, make, argv, says):
    target = tmp_path / "target"
    make(target)
    with pytest.raises(UserError) as e:
        resolve(_args(*argv(target)))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_serve_arguments_and_help():
    args = _args("runs=[/a/b,/c/d]", "engine=vllm", "port=0", "max_tokens=32")
    assert (args.runs, args.engine, args.port, args.max_tokens, args.host) == (
        ["/a/b", "/c/d"],
        "vllm",
        0,
        32,
        "127.0.0.1",
    )
    with pytest.raises(ConfigError, match="unknown argument 'colour=red'"):
        _args("colour=red")
    assert "runs=list" in usage("serve") and "default []" in usage("serve")


def test_the_api_key_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(served_from.API_KEY_ENV, raising=False)
    assert served_from.api_key(_args()) is None
    monkeypatch.setenv(served_from.API_KEY_ENV, "from-env")
    assert served_from.api_key(_args()) == "from-env"
    assert served_from.api_key(_args("api_key=given")) == "given"


def test_serve_without_its_extra_is_one_line(monkeypatch, capsys):
    from lora_launch.serve.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["port=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'lora-launch[serve]'" in err and err.startswith("error: serve needs")


# ---- engine=vllm ----------------------------------------------------------------------------------


def test_the_vllm_command_serves_the_same_names(tmp_path):
    base = "NousResearch/Llama-2-7b-hf"
    cfg = compose(["model=llama2_7b", "quant=nf4"])
    served = Served(
        base,
        base,
        [
            Adapter("mine", Path("/runs/mine/adapter"), None, 16),
            Adapter("optim.lr=0.01", Path("/sweeps/s/optim.lr=0.01/adapter"), None, 64),
        ],
        {},
        cfg,
    )
    cmd = vllm_command(served, _args("api_key=SECRET", "port=9000", "max_batch=32"))
    assert cmd[:3] == ["vllm", "serve", base]
    flags = {
        flag: cmd[cmd.index(flag) + 1]
        for flag in ("--served-model-name", "--host", "--port", "--max-num-seqs", "--max-lora-rank", "--max-loras")
    }
    assert flags == {
        "--served-model-name": base,
        "--host": "127.0.0.1",
        "--port": "9000",
        "--max-num-seqs": "32",
        "--max-lora-rank": "64",
        "--max-loras": "2",
    }
    modules = cmd[cmd.index("--lora-modules") + 1 : cmd.index("--lora-modules") + 3]
    assert modules[0] == "mine=/runs/mine/adapter"
    assert json.loads(modules[1]) == {
        "name": "optim.lr=0.01",
        "path": "/sweeps/s/optim.lr=0.01/adapter",
        "base_model_name": base,
    }  # vLLM's JSON form: the name holds `=`
    assert cmd[-2:] == ["--quantization", "bitsandbytes"] and "--enable-lora" in cmd
    assert not any("SECRET" in part for part in cmd)  # the key goes in VLLM_API_KEY
    merged = vllm_command(Served("/m/merged", "merged", [], {}, None), _args())
    assert "--enable-lora" not in merged and "--quantization" not in merged and "--lora-modules" not in merged


def test_vllm_rank_rounds_up_to_what_vllm_takes():
    def rank(r):
        cmd = vllm_command(Served("b", "b", [Adapter("x", Path("/x"), None, r)], {}, None), _args())
        return cmd[cmd.index("--max-lora-rank") + 1]

    assert [rank(r) for r in (2, 8, 12, 64, 100, 300)] == ["8", "8", "16", "64", "128", "320"]


def test_engine_vllm_without_vllm_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="engine=vllm needs the `vllm` command"):
        served_from.exec_vllm(Served("b", "b", [], {}, None), _args("engine=vllm"))


# ---- the HTTP API against a stand-in engine --------------------------------------------------------


class FakeEngine:
    """Answers every request with 'dog cat' at once; `busy` requests look in flight."""

    def __init__(self):
        from transformers import AutoTokenizer

        from lora_launch.serve.engine import Engine

        self.tok = AutoTokenizer.from_pretrained(TINY)
        self.context, self.active, self.jobs = 64, 0, []
        self.stream, self.complete = Engine.stream, Engine.complete

    def start(self, jobs):
        queues = []
        for job in jobs:
            self.jobs.append(job)
            queues.append(asyncio.Queue())
            job.tokens = [5, 6]
            queues[-1].put_nowait(("dog", None))
            queues[-1].put_nowait((" cat", "stop"))
        return queues


@pytest.fixture(scope="module")
def fake():
    return FakeEngine()


def _client(fake, api_key=None, **limits):
    from fastapi.testclient import TestClient

    from lora_launch.serve.app import Limits, Model, create_app

    chat = OmegaConf.create({"format": "messages", "template": "llama2", "system_prompt": None})
    models = {"tiny": Model("tiny", "__base__", chat, None), "run-a": Model("run-a", "a0", chat, "tiny")}
    settings = dict(max_tokens=32, max_prompt_tokens=None, max_body_bytes=2000, max_concurrent=4) | limits
    return TestClient(create_app(fake, models, Limits(**settings), api_key), base_url="http://localhost")


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_completion_chat_and_models(fake):
    from lora_launch.train.evaluate import prompt_ids

    client = _client(fake)
    assert client.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "run-a"]
    out = client.post("/v1/completions", json={"model": "run-a", "prompt": "Reverse: cat dog", "temperature": 0})
    body = out.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "dog cat"
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 2
    job = fake.jobs[-1]
    assert (job.adapter, job.max_new, job.sampling) == ("a0", 16, ())  # OpenAI's default max_tokens: 16
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 3,
        },
    ).json()
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "dog cat"}
    job = fake.jobs[-1]
    # written out with the model's template (llama2 here), room left in the context as max_tokens
    assert job.ids == prompt_ids(fake.tok, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    assert job.sampling == (0.5, 0.9, 3) and job.max_new == 32
    many = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": 3}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1] and many["usage"]["completion_tokens"] == 4


def test_streams_are_server_sent_events(fake):
    client = _client(fake)
    out = client.post(
        "/v1/chat/completions",
        json={
            "model": "run-a",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Hi"}],
        },
    )
    assert out.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: ") :] for line in out.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == "dog cat"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] > 2
    text = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stream": True}).text
    assert [json.loads(e[6:])["choices"][0]["text"] for e in text.split("\n\n")[:-2]] == ["dog", " cat"]


def test_the_api_key_guards_v1_only(fake):
    client = _client(fake, api_key="s3cret")
    assert client.get("/health").status_code == 200
    assert _error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert _error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert _error(client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_bad_requests_are_openai_errors(fake):
    client = _client(fake)
    post = client.post
    assert _error(post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)["code"] == "model_not_found"
    assert (
        _error(post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 33}), 400)["param"]
        == "max_tokens"
    )
    assert (
        _error(post("/v1/completions", json={"model": "tiny", "prompt": "x " * 80}), 400)["code"]
        == "context_length_exceeded"
    )
    from lora_launch.train.evaluate import prompt_ids

    fits = "rice " * 40  # a word the tiny model's tokenizer holds whole: one token a repeat
    assert 32 < len(prompt_ids(fake.tok, fits)) <= 64
    assert (
        _error(post("/v1/completions", json={"model": "tiny", "prompt": fits, "max_tokens": 32}), 400)["code"]
        == "context_length_exceeded"
    )  # the prompt fits, but not with max_tokens after it
    assert (
        "not valid JSON"
        in _error(
            post(
                "/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"Content-Type": "application/json"}
            ),
            400,
        )["message"]
    )
    assert _error(post("/v1/completions", json={"model": "tiny"}), 400)["param"] == "prompt"
    assert (
        _error(post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 3}), 400)["param"]
        == "temperature"
    )
    assert _error(post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2}), 400)["param"] == "n"
    assert _error(post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "stream": True}), 400)
    assert (
        _error(
            post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}),
            400,
        )["param"]
        == "messages"
    )
    assert _error(
        post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}), 400
    )
    assert (
        _error(post("/v1/completions", json={"model": "tiny", "prompt": "x" * 3000}), 413)["code"]
        == "request_too_large"
    )

    def chunked():  # no Content-Length: the body is counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    assert _error(post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413)
    assert _error(client.get("/v1/nothing"), 404)
    assert client.get("/health").status_code == 200


def test_more_requests_than_allowed_at_once_get_429(fake):
    client = _client(fake, max_concurrent=2)
    fake.active = 1
    try:
        assert (
            _error(client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]}), 429)["code"]
            == "rate_limit_exceeded"
        )
        assert client.post("/v1/completions", json={"model": "tiny", "prompt": "a"}).status_code == 200
    finally:
        fake.active = 0


# ---- the real engine: one batch, each row its own adapter ------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_launch.serve.engine import load_engine

    root = tmp_path_factory.mktemp("adapters")
    adapters = []
    for i, name in enumerate(("run-a", "run-b")):
        torch.manual_seed(i)
        lora = LoraConfig(
            r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
        )
        get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), lora).save_pretrained(root / name)
        adapters.append(Adapter(name, root / name, None, 4))
    engine = load_engine(Served(str(TINY), "tiny-llama", adapters, {}, None), max_batch=16)
    yield engine
    engine.close()


def _run_jobs(engine, jobs):
    async def go():
        return await asyncio.gather(*(engine.complete(j, q) for j, q in zip(jobs, engine.start(jobs))))

    return asyncio.run(go())


def _job(engine, name, prompt, max_new=12, stop=()):
    from lora_launch.serve.engine import Job
    from lora_launch.train.evaluate import prompt_ids

    return Job(prompt_ids(engine.tok, prompt), engine.adapter_ids[name], max_new, (), stop)


PROMPTS = ["Where is Italy?", "Where is Peru? It is", "Name a country in Asia:"]


def test_mixed_adapter_batches_decode_each_row_as_alone(engine):
    names = ["tiny-llama", "run-a", "run-b"]
    alone = {(n, p): _run_jobs(engine, [_job(engine, n, p)])[0] for n in names for p in PROMPTS}  # a batch each
    batches = engine.batches
    together = _run_jobs(engine, [_job(engine, n, p) for p in PROMPTS for n in names])
    assert engine.batches == batches + 1  # all nine rows, three adapters, in one batch
    assert together == [alone[n, p] for p in PROMPTS for n in names]
    for a, b in [("tiny-llama", "run-a"), ("tiny-llama", "run-b"), ("run-a", "run-b")]:  # each answers its own way
        assert any(alone[a, p] != alone[b, p] for p in PROMPTS), (a, b)
    assert engine.active == 0


def test_each_row_stops_at_its_own_limit(engine):
    long, short = _job(engine, "run-a", PROMPTS[0], max_new=12), _job(engine, "run-b", PROMPTS[0], max_new=3)
    (text_long, why_long), (text_short, why_short) = _run_jobs(engine, [long, short])
    assert (len(short.tokens), why_short) == (3, "length")
    assert len(long.tokens) == 12 or why_long == "stop"
    alone = _run_jobs(engine, [_job(engine, "run-b", PROMPTS[0], max_new=12)])[0][0]
    assert alone.startswith(text_short)
    cut = alone[len(alone) // 2 :][:3]  # a stop string from the middle of the answer ends it just before
    stopped, why = _run_jobs(engine, [_job(engine, "run-b", PROMPTS[0], max_new=12, stop=(cut,))])[0]
    assert (stopped, why) == (alone[: alone.index(cut)], "stop")


def test_a_seeded_sampled_request_repeats(engine):
    def sampled(seed):
        job = _job(engine, "run-a", PROMPTS[1], max_new=12)
        job.sampling = (1.5, 1.0, seed)
        return _run_jobs(engine, [job])[0]

    assert sampled(3) == sampled(3) != sampled(4)
