"""The HTTP API: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as server-sent events
with `stream: true`), and /health, on FastAPI + uvicorn.

Safe by default: it listens on 127.0.0.1 and answers only requests whose Host header names this machine's
loopback, host= or allowed_hosts= (a web page cannot reach it by DNS rebinding); with an API key every /v1
request needs `Authorization: Bearer KEY` (/health stays open: it says only "ok"); request bodies (their size
and how long they take to arrive), prompts, max_tokens and the requests answered at once are limited, and every
refusal, a client's mistake or a parameter this server cannot honour (tools, response_format, n>1), is a JSON
error in OpenAI's shape. SIGTERM stops taking connections, answers every request already taken (within
shutdown_timeout_s), and exits 0. The key is never printed or logged, nor is any query string.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lora_launch.conf.errors import UserError
from lora_launch.data.samples import as_trained
from lora_launch.data.templates import check_template, prompt_text, resolve_template
from lora_launch.run.process import StopSignals
from lora_launch.serve.adapters import Served, is_loopback
from lora_launch.serve.engine import Engine, Job
from lora_launch.train.evaluate import prompt_ids

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
BODY_IDLE_S = 5  # a body that stalls this long, or takes BODY_TOTAL_S in all, gets 408: no client holds a
BODY_TOTAL_S = 30  # connection (nor, after SIGTERM, the server) open by sending slowly
MIN_TEMPERATURE = 0.01  # below: greedy (dividing the logits by less overflows them to inf and nan)


# ---- errors in OpenAI's shape -----------------------------------------------------------------


class ApiError(UserError):
    """A request this server refuses, answered as OpenAI's error JSON with its HTTP status (a 4xx: the client's to
    fix; the server's own failures use it too, as a 500, so that every answer has one shape)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # json.dumps escapes to ASCII: a message quoting a client's lone surrogate still encodes
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json")


# ---- requests ---------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields this server does not use (user, logit_bias...) are ignored
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as torch's seed takes
    stream: bool = False
    stream_options: dict | None = None

    def refused(self) -> list[str]:
        """The parameters given that this server cannot honour."""
        return ["n"] if self.n != 1 else []


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # each token's, with this many likeliest rivals
    echo: bool = False

    def refused(self) -> list[str]:
        return super().refused() + (["echo"] if self.echo else [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    def refused(self) -> list[str]:
        asked = {
            "tools": bool(self.tools),
            "functions": bool(self.functions),
            "response_format": self.response_format not in (None, {"type": "text"}),
        }
        return super().refused() + [param for param, given in asked.items() if given]


# ---- the app ----------------------------------------------------------------------------------


@dataclass
class Model:
    """A name a request may give: the base model or an adapter, and how its chat prompts are written."""

    name: str
    adapter: str  # the engine's adapter id
    chat: DictConfig  # data config (format, template, system prompt) the chat endpoint writes prompts with
    parent: str | None  # the base model's name, for an adapter


@dataclass
class Limits:
    max_tokens: int
    max_prompt_tokens: int | None
    max_body_bytes: int
    max_concurrent: int


def models_of(served: Served, engine: Engine, template: str) -> dict[str, Model]:
    """Every served name with its chat format: a run's own (what it trained with, as `generate` writes it); for
    the base the first run's, so base and adapters answer the same prompt; `template` where no run says."""
    plain = OmegaConf.create({"format": "messages", "template": str(template), "system_prompt": None})
    plain.template = resolve_template(plain, engine.tok)
    check_template(plain, engine.tok)  # template=tokenizer for a tokenizer without one: one line at start-up
    chats = {a.name: _run_chat(served.configs[a.run], a.run) if a.run else plain for a in served.adapters}
    base_chat = next((chats[a.name] for a in served.adapters if a.run), plain)
    models = {served.base_name: Model(served.base_name, engine.adapter_ids[served.base_name], base_chat, None)}
    for a in served.adapters:
        models[a.name] = Model(a.name, engine.adapter_ids[a.name], chats[a.name], served.base_name)
    return models


def _run_chat(cfg: DictConfig, run) -> DictConfig:
    try:
        report = json.loads((run / "data_report.json").read_text())
    except (OSError, ValueError):
        report = {}
    return as_trained(cfg.data, report)


def create_app(
    engine: Engine,
    models: dict[str, Model],
    limits: Limits,
    api_key: str | None,
    hosts: frozenset[str] = LOOPBACK,
    started: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The FastAPI app over `engine`; `api_key` None: no key asked; `hosts`: the Host names answered ('*': any);
    `started` is called once the server has started."""

    @asynccontextmanager
    async def lifespan(app):
        started()
        yield

    app = FastAPI(title="lora-launch serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body=limits.max_body_bytes, hosts=hosts)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON ({first.get('msg')})").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(400, f"{where}: {first.get('msg')}", param=where or None).response()

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return ApiError(500, f"internal error ({type(e).__name__})", kind="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_card(m, created) for m in models.values()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        return _card(_model(models, name), created)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        model = _model(models, req.model)
        _refuse(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or (req.stream and len(prompts) != 1):
            raise ApiError(400, "give one prompt (several only without stream)", "prompt")
        # tokenising a long prompt takes a while: in a thread, so that the other requests go on meanwhile
        jobs = await run_in_threadpool(
            lambda: [_job(engine, model, text, req, req.max_tokens, limits, "prompt", req.logprobs) for text in prompts]
        )
        return await _answer(engine, jobs, req, model, limits, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        model = _model(models, req.model)
        _refuse(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        messages = [
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
            }
            for m in req.messages
        ]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must be the user's", "messages")
        job = await run_in_threadpool(_chat_job, engine, model, messages, req, limits)  # as completions: a thread
        return await _answer(engine, [job], req, model, limits, chat=True)

    return app


def _card(model: Model, created: int) -> dict:
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "lora-launch",
        "root": model.parent or model.name,
        "parent": model.parent,
    }


def _model(models: dict[str, Model], name: str) -> Model:
    if name not in models:
        raise ApiError(
            404, f"The model `{name}` does not exist; served: {', '.join(models)}", "model", "model_not_found"
        )
    return models[name]


def _refuse(req: _Request) -> None:
    """A 400 naming a parameter this server cannot honour, rather than an answer that ignores it."""
    if refused := req.refused():
        raise ApiError(
            400, f"{refused[0]}: not supported by this server (lora-launch serve)", refused[0], "unsupported_parameter"
        )


def _chat_job(engine: Engine, model: Model, messages: list[dict], req: ChatRequest, limits: Limits) -> Job:
    """The chat request written out with the model's template, as the engine runs it."""
    try:
        text = prompt_text(model.chat, engine.tok, messages)
    except Exception as e:  # noqa: BLE001 - a chat template may refuse an order of roles
        raise ApiError(
            400,
            f"cannot write these messages out with the {model.chat.template} template "
            f"({type(e).__name__}: {str(e)[:200]})",
            "messages",
        ) from None
    return _job(
        engine,
        model,
        text,
        req,
        req.max_completion_tokens or req.max_tokens,
        limits,
        "messages",
        (req.top_logprobs or 0) if req.logprobs else None,
    )


def _job(
    engine: Engine,
    model: Model,
    text: str,
    req: _Request,
    max_tokens: int | None,
    limits: Limits,
    param: str,
    logprobs: int | None = None,
) -> Job:
    """The request as the engine runs it, within the limits (400 naming the field otherwise). It tokenises the
    prompt: call it off the event loop."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may carry a lone surrogate ("\ud800"), which no tokenizer takes
        raise ApiError(400, f"{param}: not valid Unicode (a lone surrogate)", param, "invalid_value") from None
    ids = prompt_ids(engine.tok, text)
    room = engine.context - len(ids) if engine.context else limits.max_tokens
    max_new = max_tokens or max(1, min(limits.max_tokens, room))  # none asked: as many as fit
    if max_new > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens={max_new} is more than this server allows ({limits.max_tokens})",
            "max_tokens",
            "invalid_value",
        )
    most = limits.max_prompt_tokens or engine.context
    if most is not None and len(ids) > most:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens, more than this server takes ({most})",
            param,
            "context_length_exceeded",
        )
    if engine.context is not None and len(ids) + max_new > engine.context:
        raise ApiError(
            400,
            f"the prompt ({len(ids)} tokens) and max_tokens ({max_new}) exceed the model's context "
            f"({engine.context} tokens); ask for fewer tokens",
            param,
            "context_length_exceeded",
        )
    # an empty stop string would end every answer before its first token: it asks for nothing, and is dropped
    stop = tuple(s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or ()) if s)
    if len(stop) > 4:
        raise ApiError(400, "give at most 4 stop strings", "stop")
    sampling = () if req.temperature < MIN_TEMPERATURE else (req.temperature, req.top_p)
    if sampling and req.seed is not None:
        sampling += (req.seed,)
    return Job(ids, model.adapter, max_new, sampling, stop, logprobs)


async def _answer(engine: Engine, jobs: list[Job], req: _Request, model: Model, limits: Limits, chat: bool):
    """Run the jobs: one JSON response, or a stream of server-sent events."""
    if engine.active + len(jobs) > limits.max_concurrent:
        raise ApiError(
            429,
            f"this server answers {limits.max_concurrent} requests at once; try again shortly",
            code="rate_limit_exceeded",
            kind="rate_limit_exceeded",
        )
    queues = engine.start(jobs)  # counted as active from here until the engine finishes them
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if req.stream:
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            _events(engine, jobs[0], queues[0], model, rid, chat, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    results = await asyncio.gather(*(engine.complete(j, q) for j, q in zip(jobs, queues)))
    if any(finish == "error" for _, finish in results):
        raise ApiError(500, "generation failed (the server's log says why)", kind="server_error")
    if chat:
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": results[0][0]},
                "finish_reason": results[0][1],
                "logprobs": _logprobs(jobs[0], jobs[0].token_logprobs, chat),
            }
        ]
    else:
        choices = [
            {"index": i, "text": text, "finish_reason": finish, "logprobs": _logprobs(job, job.token_logprobs, chat)}
            for i, ((text, finish), job) in enumerate(zip(results, jobs))
        ]
    prompt = sum(len(j.ids) for j in jobs)
    completion = sum(len(j.tokens) for j in jobs)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model.name,
        "choices": choices,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


async def _events(engine: Engine, job: Job, queue, model: Model, rid: str, chat: bool, usage: bool):
    """The server-sent events of one streamed request, ending with `data: [DONE]`."""
    created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

    sent = 0  # the tokens whose log-probabilities went out: each event carries those made since

    def event(text: str | None, finish: str | None, role: bool = False) -> str:
        nonlocal sent
        tokens = job.token_logprobs[sent:] if not role else []
        offset = sum(len(t) for t, _, _ in job.token_logprobs[:sent])
        sent += len(tokens)
        logprobs = _logprobs(job, tokens, chat, offset)
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None if role else logprobs}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return _sse({"id": rid, "object": kind, "created": created, "model": model.name, "choices": [choice]})

    if chat:
        yield event(None, None, role=True)
    async for text, finish in engine.stream(job, queue):
        if finish == "error":
            yield _sse(ApiError(500, "generation failed (the server's log says why)", kind="server_error").body())
            break
        if text or finish:
            yield event(text, finish)
    if usage:
        n = len(job.tokens)
        yield _sse(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model.name,
                "choices": [],
                "usage": {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n},
            }
        )
    yield "data: [DONE]\n\n"


def _logprobs(job: Job, tokens: list, chat: bool, offset: int = 0) -> dict | None:
    """OpenAI's `logprobs` of these tokens of the job: chat's per-token list with bytes and top rivals, or the
    completions API's parallel lists; None where the request did not ask for them."""
    if job.logprobs is None:
        return None
    if chat:

        def one(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [one(t, lp) | {"top_logprobs": [one(r, v) for r, v in rivals]} for t, lp, rivals in tokens],
            "refusal": None,
        }
    offsets = [offset + sum(len(t) for t, _, _ in tokens[:i]) for i in range(len(tokens))]
    return {
        "tokens": [t for t, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": [dict(rivals) | {t: lp} for t, lp, rivals in tokens],
        "text_offset": offsets,
    }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Guard:
    """ASGI middleware in front of every route: the Host header (but on /health), the API key on /v1, and the
    body's size (413) and time to arrive (408) before any route reads it."""

    def __init__(self, app, api_key: str | None, max_body: int, hosts: frozenset[str]):
        self.app, self.max_body, self.hosts = app, max_body, hosts
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b""))
        if scope["path"] != "/health" and host not in self.hosts and "*" not in self.hosts:
            return await _send(
                send,
                ApiError(
                    421,
                    f"this server does not answer to Host {host!r}; to allow it, start it with allowed_hosts=[{host}]",
                    code="invalid_host",
                ),
            )
        if self.key and scope["path"].startswith("/v1") and not self._authorized(headers.get(b"authorization", b"")):
            return await _send(
                send,
                ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key"),
            )
        too_big = ApiError(
            413, f"the request body is larger than this server takes ({self.max_body} bytes)", code="request_too_large"
        )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            return await _send(send, too_big if length.isdigit() else ApiError(400, "bad Content-Length"))
        body, more, deadline = b"", True, time.monotonic() + BODY_TOTAL_S
        while more:  # read the whole body here, counting and timing, then hand it on
            try:
                message = await asyncio.wait_for(receive(), min(BODY_IDLE_S, deadline - time.monotonic()))
            except TimeoutError:
                return await _send(
                    send,
                    ApiError(
                        408,
                        f"the request body did not arrive in time (a pause over "
                        f"{BODY_IDLE_S} s, or {BODY_TOTAL_S} s in all)",
                        code="request_timeout",
                    ),
                    close=True,
                )
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send(send, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, key = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.key)  # the scheme in any case


def _host_name(header: bytes) -> str:
    """The name a Host header gives, lowercase, without its port or brackets ([::1]:8000 -> ::1)."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")]
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).rstrip(".")


async def _send(send, error: ApiError, close: bool = False) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": headers + ([(b"connection", b"close")] if close else []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class _NoQuery(logging.Filter):
    """Uvicorn's access log without query strings: a client may put a key there, and it must not be logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:  # client, method, path, HTTP version, status
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).split("?")[0], version, status)
        return True


# ---- running it -------------------------------------------------------------------------------


def serve(served: Served, args, api_key: str | None) -> int:
    """Listen, load the model, answer until SIGTERM (exit 0, after every request taken is answered) or Ctrl-C."""
    import uvicorn

    from lora_launch.serve.engine import load_engine

    sock = _listen(args.host, args.port)
    engine = load_engine(served, args.max_batch)
    limits = Limits(args.max_tokens, args.max_prompt_tokens, args.max_body_bytes, args.max_concurrent)
    host, port = sock.getsockname()[:2]
    hosts = LOOPBACK | {h.lower() for h in (args.host, host, *args.allowed_hosts) if not _unspecified(h)}
    names = ", ".join([served.base_name + " (base)"] + [a.name for a in served.adapters])

    def started() -> None:  # said once uvicorn handles SIGTERM: a stop sent on reading this line drains too
        print(
            f"serving {names} on http://{_url_host(host)}:{port}/v1 (adapters share batches of up to "
            f"{args.max_batch}; API key {'required' if api_key else 'not required'})",
            flush=True,
        )
        if not api_key and not is_loopback(host):  # allow_no_key=true
            print(
                f"warning: listening on {host} without an API key: anyone who reaches this port can use the "
                "models (set LORA_LAUNCH_API_KEY)",
                file=sys.stderr,
                flush=True,
            )

    app = create_app(engine, models_of(served, engine, args.template), limits, api_key, frozenset(hosts), started)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.shutdown_timeout_s))
    logging.getLogger("uvicorn.access").addFilter(_NoQuery())  # after Config, which sets uvicorn's logging up
    # uvicorn drains on SIGTERM, then raises the signal again once done: this handler takes that one
    StopSignals(signals=(signal.SIGTERM,)).install()
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    print(f"stopped: {engine.rows} requests answered in {engine.batches} batches", flush=True)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); one line when it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise UserError(
            f"serve: cannot listen on {host}:{port} ({e.strerror or e}); choose another port= (0: a free one) or host="
        ) from None
    sock.set_inheritable(True)
    return sock


def _unspecified(host: str) -> bool:
    """0.0.0.0 or ::, every interface: no name a client's Host header should carry."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
