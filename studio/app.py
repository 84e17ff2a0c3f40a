"""`lora-launch studio`: a local web app to compose, preview, launch and watch runs (FastAPI + uvicorn).

Nothing answers without the access token printed at start (`?token=` once, then a cookie or the
`X-Studio-Token` header): 401 without one, 403 for a wrong one. On loopback it answers only requests whose Host
is a loopback name (a web page cannot rebind its own name to this port). Bodies are JSON objects of at most
MAX_BODY bytes, but for an upload's file (at most MAX_UPLOAD bytes, written under ROOT/data). Every refusal is JSON
`{"error": LINE}`.
"""

# no `from __future__ import annotations`: the routes' body types are imported with fastapi, inside create_app,
# and FastAPI would look a string annotation up in this module's globals

import argparse
import hmac
import importlib.resources
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from lora_launch.conf.errors import UserError, reports_user_errors
from lora_launch.conf.schema import ConfigError
from lora_launch.run.process import StopSignals
from lora_launch.studio import form as forms
from lora_launch.studio.jobs import Endpoints, Launches, check_run_dir, command_line, preview, progress
from lora_launch.studio.paths import Places, confine
from lora_launch.studio.uploads import MAX_UPLOAD, data_files, save_upload

HEADER = "x-studio-token"
LOCAL = ("127.0.0.1", "::1", "localhost")
MAX_BODY = 1 << 20  # a form is a few KiB
UPLOAD = "/api/upload"  # the one route that takes a file's bytes, up to MAX_UPLOAD


class Refused(UserError):
    """A request the studio refuses, answered as JSON `{"error": LINE}` with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def _page() -> str:
    return importlib.resources.files("lora_launch.studio").joinpath("page.html").read_text()


def create_app(token: str, places: Places, port: int, hosts: tuple[str, ...] | None = LOCAL):
    """The app: the page, the form from the schema, and the API behind its buttons; `hosts`: the Host names it
    answers (None: any)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    from lora_launch.catalog.runs import find_runs, read_run
    from lora_launch.catalog.table import diff_json, sort_runs
    from lora_launch.studio.bodies import AskBody, DataBody, FormBody, RunBody

    app = FastAPI(title="lora-launch studio", docs_url=None, redoc_url=None, openapi_url=None)
    launches, endpoints = Launches(places.root), Endpoints(places.root)
    app.state.endpoints = endpoints
    cookie = f"lora_launch_studio_{port}"  # cookies are shared across ports: one name per studio

    @app.middleware("http")
    async def guard(request: Request, call_next):
        auth = request.headers.get("authorization", "")
        given = (
            request.query_params.get("token")
            or request.headers.get(HEADER)
            or (auth[7:] if auth.lower().startswith("bearer ") else None)
            or request.cookies.get(cookie)
        )
        if not given:
            return JSONResponse(
                {"error": "no access token: open the URL `lora-launch studio` printed (it ends in ?token=...)"},
                status_code=401,
            )
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse(
                {"error": "wrong access token: open the URL `lora-launch studio` printed"}, status_code=403
            )
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(cookie, token, httponly=True, samesite="strict")
        return response

    app.add_middleware(_Gate, hosts=hosts)  # added last: it runs first, before the token is looked at

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(ConfigError)
    async def config_error(request, e: ConfigError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse({"error": _invalid_body(e.errors())}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        return JSONResponse(
            {"error": f"internal error ({type(e).__name__}); the studio's terminal shows it"}, status_code=500
        )

    def checked(cfg) -> None:
        """The composed config's paths lie in the studio's folders, its run dir apart from the studio's own."""
        confine(cfg, places)
        check_run_dir(places.root, places.resolve(cfg.run.dir), cfg.run.dir)

    def composed(body: FormBody, launch: bool = False):
        overrides = forms.build_overrides(body.groups, body.values)
        if launch and not any(o.startswith("run.dir=") for o in overrides):
            overrides.append(f"run.dir={_new_run_dir(places.root)}")
        cfg = forms.compose_checked(overrides)
        checked(cfg)
        return overrides, cfg

    def run_path(ref: str) -> Path:
        if not ref:
            raise Refused("give the run: its dir (e.g. runs/NAME)")
        path = places.check("run.dir", ref)
        if not path.is_dir():
            raise Refused(f"{ref}: no such run dir", 404)
        return path

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(_page(), headers={"Cache-Control": "no-store"})

    @app.get("/api/form")
    def get_form():
        cfg = forms.compose_checked([])
        return {**forms.form(), "values": forms.flat_values(cfg), "root": str(places.root)}

    @app.post("/api/validate")
    def validate(body: FormBody):
        overrides, cfg = composed(body)
        return {
            "ok": True,
            "overrides": overrides,
            "command": command_line(overrides),
            "values": forms.flat_values(cfg),
        }

    @app.post("/api/preview")
    def do_preview(body: FormBody):
        overrides, _ = composed(body)
        return {
            "text": preview(places.root, overrides),
            "command": command_line(overrides),
            "preview_command": command_line([*overrides, "preview=true"]),
        }

    @app.get("/api/files")
    def files():
        return {"files": data_files(places.root)}

    @app.post(UPLOAD)
    async def upload(request: Request, name: str = ""):
        return {"path": save_upload(places.root, name, await request.body())}

    @app.post("/api/data")
    def data(body: DataBody):
        from lora_launch.studio.samples_view import data_view

        _, cfg = composed(body)
        return data_view(cfg, body.records)

    @app.post("/api/launch")
    def launch(body: FormBody):
        overrides, cfg = composed(body, launch=True)
        return _start(overrides, places.check("run.dir", cfg.run.dir))

    def _start(overrides: list[str], run_dir: Path) -> dict:
        try:
            started = launches.start(run_dir, overrides)
        except ConfigError as e:
            raise Refused(str(e), 409) from None
        return {**started, "run_dir": str(run_dir), "command": command_line(overrides)}

    @app.post("/api/stop")
    def stop(body: RunBody):
        try:
            return launches.stop(run_path(body.dir))
        except ConfigError as e:
            raise Refused(str(e), 409) from None

    @app.post("/api/resume")
    def resume(body: RunBody):
        run_dir = run_path(body.dir)
        overrides = launches.resume_overrides(run_dir)
        for o in overrides:
            forms.check_override(o)
        cfg = forms.compose_checked(overrides)
        checked(cfg)
        if places.check("run.dir", cfg.run.dir) != run_dir:
            raise Refused(f"{run_dir}: its command names another run.dir ({cfg.run.dir})")
        return _start(overrides, run_dir)

    def all_runs():
        folders = [places.root / d for d in ("runs", "sweeps") if (places.root / d).is_dir()]
        runs = find_runs(folders)
        for r in runs:  # named as the page and the command line reach them: relative to the root
            r.name = os.path.relpath(r.path, places.root)
        seen = {r.path.resolve() for r in runs}
        for path in launches.recorded_dirs():  # run dirs launched here outside runs/ and sweeps/
            if path.resolve() not in seen and path.is_dir():
                runs.append(read_run(path, os.path.relpath(path, places.root)))
        return runs

    @app.get("/api/runs")
    def runs(sort: str = "-date"):
        try:
            listed = sort_runs(all_runs(), sort)
        except ConfigError as e:
            raise Refused(str(e)) from None
        return {"runs": [r.row() for r in listed], "serving": endpoints.listing()}

    @app.get("/api/run")
    def run(dir: str = ""):
        path = run_path(dir)
        return {
            **progress(path),
            "dir": dir,
            "path": str(path),
            "log": launches.log_tail(path),
            "launched_here": bool(launches.record(path)),
            "serving": endpoints.listing().get(str(path)),
        }

    @app.get("/api/diff")
    def diff(a: str = "", b: str = ""):
        return diff_json(read_run(run_path(a), a), read_run(run_path(b), b))

    @app.post("/api/serve")
    def serve(body: RunBody):
        path = run_path(body.dir)
        r = read_run(path)
        if r.status != "finished" or r.adapter is None:
            raise Refused(f"{body.dir}: {r.status}; an endpoint serves a finished run's adapter", 409)
        ep = endpoints.start(path)
        return {"url": ep.url, "model": ep.model}

    @app.post("/api/serve/stop")
    def serve_stop(body: RunBody):
        endpoints.stop(run_path(body.dir))
        return {"ok": True}

    @app.post("/api/ask")
    def ask(body: AskBody):
        if not body.prompt.strip():
            raise Refused("write a prompt first")
        return endpoints.ask(run_path(body.dir), body.prompt, body.max_tokens)

    return app


def _invalid_body(errors: list[dict]) -> str:
    """One line for FastAPI's reading of a body: not JSON, or the first field that is missing, extra or mistyped."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error') or first.get('msg')})"
    path = [p for p in first.get("loc", ()) if p != "body"]
    if not path:
        return f"the request body: {first.get('msg')} (send a JSON object)"
    where = str(path[0]) + "".join(f"[{json.dumps(p)}]" for p in path[1:])
    return f"{where}: {first.get('msg')}"


class _Gate:
    """ASGI middleware in front of everything: the Host check, then the body limit, counted as the body arrives so
    that no more than MAX_BODY bytes are ever held."""

    def __init__(self, app, hosts: tuple[str, ...] | None):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = _hostname(headers.get(b"host", b"").decode("latin-1").lower())
        if self.hosts is not None and host not in self.hosts:
            return await _refuse(
                send,
                403,
                f"Host {host or '(none)'}: this studio answers at "
                f"{' or '.join(self.hosts)} only; open the URL it printed",
            )
        length = headers.get(b"content-length", b"0").decode("latin-1")
        limit = MAX_UPLOAD if scope["path"] == UPLOAD else MAX_BODY
        too_big = f"the request body is larger than the studio takes ({limit} bytes)"
        if not length.isdigit():
            return await _refuse(send, 400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > limit:
            return await _refuse(send, 413, too_big)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:  # a chunked body has no Content-Length
                return await _refuse(send, 413, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _hostname(host: str) -> str:
    """The name in a Host header, without its port or an IPv6 address's brackets."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _new_run_dir(root: Path) -> str:
    """runs/<timestamp>, as the config's default names it, made unique among the dirs here."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    name, n = f"runs/{stamp}", 1
    while (root / name).exists():
        n += 1
        name = f"runs/{stamp}-{n}"
    return name


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(f"studio: {message} (see lora-launch studio --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lora-launch studio", description="A local web app to compose, preview, launch and watch fine-tunes."
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one)")
    p.add_argument(
        "--root",
        default=".",
        help="folder of run dirs and data; paths outside it are refused (default: the current directory)",
    )
    p.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder configs may name (data, models, run dirs); repeatable",
    )
    return p


@reports_user_errors
def main(argv: list[str]) -> int:
    """Start the studio; bad arguments and a busy port are one `error:` line, exit 2."""
    import importlib.util

    args = _parser().parse_args(argv)
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"studio needs {' and '.join(missing)}: `pip install 'lora-launch[studio]'`")
    root = Path(args.root).expanduser()
    for d in (root, *map(Path, args.allow_path)):
        if not d.expanduser().is_dir():
            raise UserError(f"studio: {d} is not a directory (--root / --allow-path)")
    places = Places(root, [Path(p).expanduser() for p in args.allow_path])
    os.chdir(places.root)  # relative paths in configs mean the same here as in the launches started here
    try:
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((args.host, args.port), family=family)
    except OSError as e:
        raise UserError(
            f"studio: cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another "
            "--port (0: a free one)"
        ) from None
    return _serve(sock, places, args.host)


def _serve(sock: socket.socket, places: Places, host: str) -> int:
    import signal

    import uvicorn

    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(24)
    app = create_app(token, places, port, LOCAL if host in LOCAL else None)  # elsewhere: names are unknown
    shown = f"[{host}]" if ":" in host else host
    print(f"lora-launch studio for {places.root}: open http://{shown}:{port}/?token={token}", flush=True)
    if host not in LOCAL:
        print(
            f"warning: listening on {host}: anyone who reaches this port and has the URL can launch runs here",
            file=sys.stderr,
            flush=True,
        )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    StopSignals(signals=(signal.SIGTERM,)).install()  # uvicorn handles it, then raises it again; runs keep going
    try:
        server.run(sockets=[sock])
    finally:
        app.state.endpoints.stop_all()
    print("studio stopped; runs it launched go on (reopen the studio to watch them)", flush=True)
    return 0
