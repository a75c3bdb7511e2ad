"""`edge-unisd serve`: a local OpenAI-compatible endpoint on the user's current GGUF that can learn from use.

    edge-unisd serve [--host 127.0.0.1] [--port 8765] [--collect | --no-collect] [--json]
    # then point any OpenAI client at http://127.0.0.1:8765/v1 (any API key unless serve_api_key is set)

llama-cpp-python's own server answers /v1/chat/completions (streaming too), /v1/completions and its
extras: this module mounts its router and puts three small pieces around it:
- `serve_model.ModelSwitch` replaces its model proxy: the current GGUF, switched to a newly
  published one without a restart, old requests finishing on the old model; /v1/models names the
  version being served;
- `serve_collect.ExchangeMiddleware`: every response names that version in `model`; with collection
  on (settings `collect = true` or --collect), each exchange is stored as an item and rollout,
  and the response `id` (and header `x-edge-unisd-item`) is the item id that POST /v1/feedback takes;
- `serve_guard.GuardMiddleware`: loopback Host names unless an API key is set, the key (401),
  request size (413) and concurrency (429).

llama-cpp-python keeps its server's state in module globals (settings, model proxy, locks), so one
process serves one app at a time; `build_app` (re)sets them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from daemon.home import Home
from daemon.serve_collect import ExchangeMiddleware, Feedback, FeedbackError, Recorder, apply_feedback
from daemon.serve_guard import GuardMiddleware, ServeLimits, is_loopback_host
from daemon.serve_model import LLAMA_ENV_PREFIX, ModelFileError, ModelSwitch, load_llama
from daemon.settings import load_settings
from daemon.store import Store

log = logging.getLogger(__name__)

MODEL_ID = "edge-unisd"  # the one model id /v1/models lists; what clients send as `model` is ignored
POLL_SECONDS = 2.0
DEFAULT_LIMITS = ServeLimits()


class ServeError(RuntimeError):
    """serve cannot start (address in use, remote bind without a key, no model); printed as one line."""


# --- the app -------------------------------------------------------------------------------------

def build_app(home: Home, *, collect: bool, api_key: str | None = None, base_model: str | None = None,
              limits: ServeLimits = DEFAULT_LIMITS, poll_seconds: float = POLL_SECONDS,
              llama_options: dict[str, Any] | None = None,
              loader: Callable[[Path], Any] | None = None) -> FastAPI:
    """The ASGI app of `serve` for `home`, with its model loaded (ModelFileError if there is none).

    `llama_options`: extra llama-cpp-python ModelSettings fields (n_ctx, n_threads, n_gpu_layers...);
    they can also come from EDGE_UNISD_LLAMA_<FIELD>. `loader` replaces `load_llama` (tests).
    `app.state.switch` is the ModelSwitch,
    `app.state.store` the Store (closed when the app shuts down).
    """
    from llama_cpp.server import app as llama_app
    from llama_cpp.server.settings import ServerSettings

    switch = ModelSwitch(home.exports, base_model, loader=loader or partial(load_llama, **(llama_options or {})))
    switch.load()
    store = Store.open(home)
    llama_app.set_server_settings(ServerSettings(_env_prefix=LLAMA_ENV_PREFIX, api_key=api_key,
                                                 interrupt_requests=False))  # never cut a stream for a new one
    llama_app._llama_proxy = switch  # the proxy its routes ask for the model; no public setter takes one

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # its locks serialise llama.cpp calls; fresh ones belong to this server's event loop
        llama_app.llama_outer_lock, llama_app.llama_inner_lock = anyio.Lock(), anyio.Lock()
        watcher = asyncio.create_task(_watch(switch, poll_seconds))
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            switch.free()
            store.close()

    app = FastAPI(title="edge-unisd serve", lifespan=lifespan)
    app.state.switch, app.state.store, app.state.collect = switch, store, collect

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        """The one model, with the version being served (a new version shows here once it answers)."""
        return {"object": "list", "data": [switch.current.model_card(MODEL_ID)]}

    @app.post("/v1/feedback")
    def feedback(fb: Feedback) -> Any:
        """A rating or correction of a served answer, by the item id its response carried."""
        try:
            return apply_feedback(store, fb)
        except FeedbackError as e:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error",
                                           "code": "not_found" if e.status == 404 else "no_answer",
                                           "param": "id"}}, status_code=e.status)
        except KeyError as e:  # forgotten between the read and the write
            return JSONResponse({"error": {"message": str(e.args[0]), "type": "invalid_request_error",
                                           "code": "not_found", "param": "id"}}, status_code=404)

    app.include_router(llama_app.router)  # after ours: the first matching route wins
    app.add_middleware(ExchangeMiddleware, switch=switch, recorder=Recorder(store) if collect else None)
    app.add_middleware(GuardMiddleware, api_key=api_key, limits=limits)  # added last: runs first
    return app


async def _watch(switch: ModelSwitch, poll_seconds: float) -> None:
    """Poll the served file; a change loads the new model in a worker thread while requests go on."""
    while True:
        await asyncio.sleep(poll_seconds)
        await anyio.to_thread.run_sync(switch.poll, abandon_on_cancel=True)


# --- the command ---------------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    """Listen before loading the model, so a taken port is reported at once and port 0 gets a real one."""
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                         "choose another --port (or serve_port in settings.toml) or stop what uses it") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def main(args: argparse.Namespace) -> int:
    """`edge-unisd serve`: args.home, args.host, args.port (None: from settings), args.collect (None: from
    settings), args.json (print the start-up facts as one JSON line). Blocks until SIGINT/SIGTERM."""
    import uvicorn

    home = Home.resolve(args.home).require()
    settings = load_settings(home.settings)
    host = args.host or settings.serve_host
    port = settings.serve_port if args.port is None else args.port
    collect = settings.collect if args.collect is None else bool(args.collect)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if not is_loopback_host(host) and settings.serve_api_key is None:
            raise ServeError(f"--host {host} is not loopback: set serve_api_key in {home.settings} (at least 16 "
                             "characters) so only clients with the key are answered, or serve on 127.0.0.1")
        sock = _bind(host, port)
        try:
            app = build_app(home, collect=collect, api_key=settings.serve_api_key, base_model=settings.base_model)
        except BaseException:
            sock.close()
            raise
    except (ServeError, ModelFileError) as e:
        print(f"edge-unisd: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    version = app.state.switch.current
    facts = {"url": _url(sock), "model": MODEL_ID, "version": version.label, "path": str(version.path),
             "collect": collect, "api_key_required": settings.serve_api_key is not None}
    if args.json:
        print(json.dumps(facts), flush=True)
    else:
        print(f"serving {version.label} ({version.path}) at {facts['url']}; collection "
              f"{'ON: exchanges are stored as items' if collect else 'off'}", flush=True)
    config = uvicorn.Config(app, log_level=settings.log_level, timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
