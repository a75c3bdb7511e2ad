"""`edge-unisd serve`: the door (401/403/413/429), collection and feedback, the version switch, and the real
server on the bundled GGUF talked to by the official openai client (those tests are marked slow)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from adapters.publish import swap_in
from daemon.home import Home
from daemon.serve_collect import (
    ITEM_HEADER,
    ExchangeMiddleware,
    Feedback,
    FeedbackError,
    NotCollectable,
    Recorder,
    apply_feedback,
    row_from_request,
)
from daemon.serve_guard import GuardMiddleware, ServeLimits, is_loopback_host
from daemon.serve_model import ModelSwitch
from daemon.settings import write_default_settings
from daemon.store import Store
from edge_unisd.items import IngestRow

SECRET = "prompt-text-that-must-never-reach-info-logs"


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path / "home").create()
    write_default_settings(h.settings)
    Store.open(h).close()
    return h


@pytest.fixture
def store(home):
    with Store.open(home) as s:
        yield s


# --- calling an ASGI app in-process --------------------------------------------------------------

async def asgi(app, path="/v1/chat/completions", body: bytes | list[bytes] = b"{}", method="POST",
               headers: dict[str, str] | None = None, on_send=None) -> tuple[int, dict[bytes, bytes], bytes]:
    chunks = body if isinstance(body, list) else [body]
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    never = asyncio.Event()

    async def receive():
        if incoming:
            return incoming.pop(0)
        await never.wait()

    status, hdrs, out = 0, {}, []

    async def send(message):
        nonlocal status, hdrs
        if on_send is not None:
            await on_send(message)
        if message["type"] == "http.response.start":
            status, hdrs = message["status"], dict(message["headers"])
        else:
            out.append(message.get("body", b""))

    h = {"host": "127.0.0.1:8765", "content-type": "application/json", **(headers or {})}
    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.encode(), v.encode()) for k, v in h.items()]}
    await app(scope, receive, send)
    return status, hdrs, b"".join(out)


async def ok_app(scope, receive, send):
    body = b'{"ok": true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"12")]})
    await send({"type": "http.response.body", "body": body})


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]


# --- the door ------------------------------------------------------------------------------------

def test_key_is_required_and_checked_when_set():
    app = GuardMiddleware(ok_app, api_key="k" * 20)
    status, hdrs, body = asyncio.run(asgi(app))
    assert status == 401 and error_code(body) == "invalid_api_key" and hdrs[b"www-authenticate"] == b"Bearer"
    assert asyncio.run(asgi(app, headers={"authorization": "Bearer " + "x" * 20}))[0] == 401
    assert asyncio.run(asgi(app, method="GET", path="/docs"))[0] == 401  # every path, not only the model's
    assert asyncio.run(asgi(app, headers={"authorization": "Bearer " + "k" * 20}))[0] == 200


def test_without_a_key_only_loopback_host_names_are_answered():
    app = GuardMiddleware(ok_app, api_key=None)
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "app.localhost"):
        assert asyncio.run(asgi(app, headers={"host": host}))[0] == 200, host
    status, _, body = asyncio.run(asgi(app, headers={"host": "evil.example:8765"}))  # DNS rebinding
    assert status == 403 and error_code(body) == "host_not_allowed"
    keyed = GuardMiddleware(ok_app, api_key="k" * 20)
    assert asyncio.run(asgi(keyed, headers={"host": "box.lan:8765", "authorization": "Bearer " + "k" * 20}))[0] == 200
    assert is_loopback_host("127.3.4.5") and not is_loopback_host("0.0.0.0") and not is_loopback_host("10.0.0.1")


def test_request_size_is_bounded_by_header_and_by_what_arrives():
    app = GuardMiddleware(ok_app, api_key=None, limits=ServeLimits(max_body_bytes=2048))
    status, _, body = asyncio.run(asgi(app, body=b"x" * 10, headers={"content-length": "5000"}))
    assert status == 413 and "2048 bytes" in json.loads(body)["error"]["message"]
    status, _, _ = asyncio.run(asgi(app, body=[b"x" * 1500, b"x" * 1500]))  # chunked, no length
    assert status == 413
    assert asyncio.run(asgi(app, body=[b"x" * 1000, b"x" * 1000]))[0] == 200


def test_concurrency_is_bounded_with_429_and_slots_come_back():
    release = asyncio.Event()
    entered = []

    async def slow_app(scope, receive, send):
        if scope["path"] != "/v1/feedback":
            entered.append(1)
            await release.wait()
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        await ok_app(scope, receive, send)

    app = GuardMiddleware(slow_app, api_key=None, limits=ServeLimits(max_active=2))

    async def scenario():
        first = [asyncio.create_task(asgi(app, path=p)) for p in ("/v1/completions", "/boom")]
        while len(entered) < 2:
            await asyncio.sleep(0)
        status, hdrs, body = await asgi(app)  # full: refused at once, not queued
        cheap = await asgi(app, path="/v1/feedback")  # never counted
        release.set()
        results = await asyncio.gather(*first, return_exceptions=True)
        again = await asgi(app)
        return status, hdrs, body, cheap, results, again

    status, hdrs, body, cheap, results, again = asyncio.run(scenario())
    assert status == 429 and hdrs[b"retry-after"] == b"1" and error_code(body) == "server_busy"
    assert cheap[0] == 200
    assert results[0][0] == 200 and isinstance(results[1], RuntimeError)
    assert again[0] == 200 and app.active == 0  # the slot of the failed request was given back


# --- the served version --------------------------------------------------------------------------

class FakeLlama:
    def __init__(self, path: Path):
        self.path, self.closed = path, False

    def close(self) -> None:
        self.closed = True


def publish(exports: Path, name: str, content: bytes = b"GGUF fake") -> Path:
    builds = exports / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    (builds / name).write_bytes(content)
    return swap_in(builds / name, exports / "current.gguf")


def test_versions_are_named_by_their_build_else_by_their_hash(tmp_path):
    base = tmp_path / "base.gguf"
    base.write_bytes(b"base weights")
    switch = ModelSwitch(tmp_path / "exports", str(base), loader=FakeLlama)
    v = switch.load()
    assert v.kind == "base" and v.label.startswith("base-") and v.sha256 and v.adapter is None
    publish(tmp_path / "exports", "v0003-q8_0-20260101T000000Z.gguf")
    v = switch.poll()
    assert v.label == "v0003-q8_0-20260101T000000Z" and v.adapter == "v0003" and v.kind == "export"
    assert switch.poll() is None  # unchanged: nothing reloaded
    card = switch.current.model_card("edge-unisd")
    assert card["id"] == "edge-unisd" and card["version"] == v.label and card["object"] == "model"
    (tmp_path / "exports" / "stray.gguf").write_bytes(b"other")
    os.replace(tmp_path / "exports" / "stray.gguf", tmp_path / "exports" / "current.gguf")
    assert switch.poll().label.startswith("current-")


def test_switch_keeps_the_old_model_open_for_requests_in_flight(tmp_path):
    exports = tmp_path / "exports"
    publish(exports, "v0001-f16-a.gguf")
    switch = ModelSwitch(exports, loader=FakeLlama)
    switch.load()
    with switch.request_scope() as served:
        old = switch()  # what a request in flight got
        publish(exports, "v0002-f16-b.gguf", b"GGUF other")
        assert switch.poll().label == "v0002-f16-b"
        assert switch("again") is old  # one request, one model
        with switch.request_scope():
            new = switch()
        assert new is not old and served.version.label == "v0001-f16-a"
        assert switch.draining() == 1 and not old.closed
    assert old.closed and switch.draining() == 0 and not new.closed  # closed when its last request ended
    publish(exports, "v0003-f16-c.gguf", b"GGUF third")
    switch.poll()
    assert new.closed  # nobody was using it: closed at the switch


def test_a_new_file_that_fails_to_load_keeps_the_old_one_serving(tmp_path, caplog):
    exports = tmp_path / "exports"
    publish(exports, "v0001-f16-a.gguf")
    calls = []

    def loader(path):
        calls.append(path)
        if len(calls) == 2:
            raise ValueError("bad magic")
        return FakeLlama(path)

    switch = ModelSwitch(exports, loader=loader)
    switch.load()
    publish(exports, "v0002-f16-b.gguf", b"broken")
    with caplog.at_level(logging.WARNING):
        assert switch.poll() is None
    assert switch.current.label == "v0001-f16-a" and "did not load" in caplog.text
    assert switch.poll() is None and len(calls) == 2  # not retried until the file changes again
    publish(exports, "v0003-f16-c.gguf", b"fixed")
    assert switch.poll().label == "v0003-f16-c"


# --- collection around a stand-in of llama-cpp-python's routes -----------------------------------

def fake_llama_app(switch: ModelSwitch, text: str = "Hello there", status: int = 200, cut: bool = False):
    """Answers like llama-cpp-python's server (JSON, or SSE chunks ending in [DONE]); asks `switch` first."""

    async def app(scope, receive, send):
        switch("whatever-the-client-said")
        req = json.loads((await receive())["body"])
        chat = scope["path"].endswith("chat/completions")
        if status != 200:
            body = b'{"error": {"message": "nope"}}'
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        if not req.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": text, "finish_reason": "stop"})
            body = json.dumps({"id": "chatcmpl-1", "model": "x", "choices": [choice]}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        words = text.split(" ")
        for i, w in enumerate(words):
            piece = w if i == 0 else " " + w
            choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                      else {"index": 0, "text": piece, "finish_reason": None})
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + json.dumps({"id": "c-1", "choices": [choice]}).encode() + b"\n\n"})
            if cut:  # the client went away mid-answer
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
        end = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else {"index": 0, "text": "",
                                                                                "finish_reason": "stop"}
        await send({"type": "http.response.body", "more_body": True,
                    "body": b": ping\n\ndata: " + json.dumps({"id": "c-1", "choices": [end]}).encode() + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@pytest.fixture
def switch(home):
    publish(home.exports, "v0007-q8_0-x.gguf")
    s = ModelSwitch(home.exports, loader=FakeLlama)
    s.load()
    return s


def chat(content: str = SECRET, stream: bool = False) -> bytes:
    return json.dumps({"model": "anything", "stream": stream,
                       "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": content}]}).encode()


def test_a_collected_exchange_is_an_item_with_its_completion(switch, store):
    app = ExchangeMiddleware(fake_llama_app(switch), switch=switch, recorder=Recorder(store))
    status, hdrs, body = asyncio.run(asgi(app, body=chat()))
    resp = json.loads(body)
    assert status == 200 and resp["id"] == hdrs[ITEM_HEADER].decode() and resp["model"] == "v0007-q8_0-x"
    assert int(hdrs[b"content-length"]) == len(body)
    [item] = store.get_items()
    assert item.id == resp["id"] and item.source == "serve"
    assert item.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": SECRET})
    [rollout] = store.rollouts_for(item.id)
    assert rollout.completion == "Hello there" and rollout.adapter_version == "v0007"


def test_a_streamed_exchange_is_stored_before_the_stream_ends(switch, store):
    app = ExchangeMiddleware(fake_llama_app(switch, text="one two three"), switch=switch, recorder=Recorder(store))
    stored_at_done = []

    async def on_send(message):
        if b"[DONE]" in message.get("body", b""):
            stored_at_done.append(store.count_rollouts())

    status, hdrs, body = asyncio.run(asgi(app, body=chat("stream me", stream=True), on_send=on_send))
    events = [json.loads(e[6:]) for e in body.decode().split("\n\n") if e.startswith("data: {")]
    item_id = hdrs[ITEM_HEADER].decode()
    assert status == 200 and stored_at_done == [1] and b": ping" in body
    assert {e["id"] for e in events} == {item_id} and {e["model"] for e in events} == {"v0007-q8_0-x"}
    assert [r.completion for r in store.rollouts_for(item_id)] == ["one two three"]


def test_completions_endpoint_is_collected_as_a_user_turn(switch, store):
    app = ExchangeMiddleware(fake_llama_app(switch, text=" Paris"), switch=switch, recorder=Recorder(store))
    body = json.dumps({"prompt": ["The capital of France is"], "stream": True}).encode()
    status, hdrs, _ = asyncio.run(asgi(app, path="/v1/completions", body=body))
    [item] = store.get_items()
    assert item.messages == ({"role": "user", "content": "The capital of France is"},)
    assert store.rollouts_for(item.id)[0].completion == " Paris"


def test_a_failed_request_leaves_no_item_and_collection_off_stores_nothing(switch, store):
    failing = ExchangeMiddleware(fake_llama_app(switch, status=500), switch=switch, recorder=Recorder(store))
    status, hdrs, _ = asyncio.run(asgi(failing, body=chat()))
    assert status == 500 and ITEM_HEADER not in hdrs and store.count_items().total == 0
    cut = ExchangeMiddleware(fake_llama_app(switch, cut=True), switch=switch, recorder=Recorder(store))
    status, hdrs, _ = asyncio.run(asgi(cut, body=chat(stream=True)))
    assert ITEM_HEADER in hdrs and store.count_items().total == 0  # announced, then removed: no answer
    off = ExchangeMiddleware(fake_llama_app(switch), switch=switch, recorder=None)
    for stream in (False, True):
        status, hdrs, body = asyncio.run(asgi(off, body=chat(stream=stream)))
        assert status == 200 and ITEM_HEADER not in hdrs and b'"model": "v0007-q8_0-x"' in body
    assert store.count_items().total == 0 and store.count_rollouts() == 0


def test_a_store_failure_never_fails_the_request_and_logs_no_prompt_text(switch, caplog):
    class LockedStore:
        def add_items(self, rows, **kw):  # SQLAlchemy's message would list the prompt among the parameters
            raise OperationalError("INSERT INTO items ...", (SECRET,), sqlite3.OperationalError("database is locked"))

    app = ExchangeMiddleware(fake_llama_app(switch), switch=switch, recorder=Recorder(LockedStore()))
    with caplog.at_level(logging.INFO):
        status, hdrs, body = asyncio.run(asgi(app, body=chat()))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello there"
    assert "could not store a collected prompt (OperationalError: database is locked)" in caplog.text
    assert SECRET not in caplog.text


def test_requests_that_cannot_be_items_are_served_and_say_why_without_text():
    row = row_from_request("chat", json.dumps({"messages": [
        {"role": "developer", "content": "terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}).encode())
    assert row.messages() == [{"role": "system", "content": "terse"}, {"role": "user", "content": "ab"}]
    assert isinstance(row, IngestRow) and row.source == "serve"
    bad = [("chat", {"messages": [{"role": "tool", "content": "x"}]}),
           ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
           ("chat", {"messages": [{"role": "user", "content": SECRET}, {"role": "assistant", "content": "a"}]}),
           ("completion", {"prompt": [1, 2, 3]})]
    for kind, req in bad:
        with pytest.raises(NotCollectable) as e:
            row_from_request(kind, json.dumps(req).encode())
        assert SECRET not in str(e.value)


# --- feedback ------------------------------------------------------------------------------------

def test_feedback_sets_reference_and_rejected(store):
    ids = store.add_items([IngestRow(prompt=f"q{i}") for i in range(3)]).item_ids
    for i in ids:
        store.record_rollout(i, f"served answer {i}")
    assert apply_feedback(store, Feedback(id=ids[0], correction="the right answer")) == {
        "id": ids[0], "reference": True, "rejected": False}
    apply_feedback(store, Feedback(id=ids[1], rating="down"))
    apply_feedback(store, Feedback(id=ids[2], rating="up"))
    a, b, c = store.get_items(ids)
    assert (a.reference, a.rejected) == ("the right answer", None)
    assert (b.reference, b.rejected) == (None, f"served answer {ids[1]}")
    assert (c.reference, c.rejected) == (f"served answer {ids[2]}", None)  # an accepted answer
    apply_feedback(store, Feedback(id=ids[0], rating="up"))  # never overwrites the user's own answer
    assert store.get_items([ids[0]])[0].reference == "the right answer"


def test_feedback_errors(store):
    [bare] = store.add_items([IngestRow(prompt="never answered")]).item_ids
    with pytest.raises(FeedbackError) as e:
        apply_feedback(store, Feedback(id="nope", rating="up"))
    assert e.value.status == 404
    with pytest.raises(FeedbackError) as e:
        apply_feedback(store, Feedback(id=bare, rating="down"))
    assert e.value.status == 409
    with pytest.raises(ValueError):
        Feedback(id=bare)
    with pytest.raises(KeyError):
        store.set_item_rejected("nope", "x")


# --- the command's checks before any model is loaded ---------------------------------------------

def serve_args(home: Home, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{"home": str(home.root), "host": None, "port": 0, "collect": None, "json": False,
                                 **kw})


def test_serve_refuses_a_remote_address_without_a_key(home, capsys):
    from daemon.serve import main

    assert main(serve_args(home, host="0.0.0.0")) == 2
    assert "serve_api_key" in capsys.readouterr().err


def test_serve_reports_a_port_in_use(home, capsys):
    from daemon.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(serve_args(home, port=taken.getsockname()[1])) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# --- the real server on the bundled GGUF (slow) --------------------------------------------------

class Server:
    """uvicorn serving `app` on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()

    def client(self, key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=300, **kw)


def serve(home: Home, **kw):
    from daemon.serve import build_app

    return build_app(home, poll_seconds=0.1, llama_options={"n_threads": 1}, **kw)


def say(n: int | str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Say hi ({n})"}]


@pytest.mark.slow
def test_openai_client_plain_stream_completion_and_feedback(home):
    import httpx2

    with Server(serve(home, collect=True)) as srv, Store.open(home) as store:
        client = srv.client()
        [model] = client.models.list().data
        assert model.id == "edge-unisd" and model.version.startswith("base-")
        plain = client.chat.completions.create(model="gpt-4o", messages=say(1), max_tokens=3)
        assert plain.model == model.version and plain.choices[0].message.content
        chunks = list(client.chat.completions.create(model="x", messages=say(2), max_tokens=3, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason and len({c.id for c in chunks}) == 1
        text = client.completions.create(model="x", prompt="The capital of France is", max_tokens=3)
        # each exchange is an item whose rollout is exactly what the client got
        for resp, answer in ((plain, plain.choices[0].message.content), (chunks[0], streamed),
                             (text, text.choices[0].text)):
            [rollout] = store.rollouts_for(resp.id)
            assert rollout.completion == answer
        assert store.get_items([plain.id])[0].messages == tuple(say(1))
        r = httpx2.post(srv.url + "/feedback", json={"id": plain.id, "rating": "down", "correction": "Hi!"})
        assert r.status_code == 200 and r.json() == {"id": plain.id, "reference": True, "rejected": True}
        item = store.get_items([plain.id])[0]
        assert (item.reference, item.rejected) == ("Hi!", plain.choices[0].message.content)
        assert httpx2.post(srv.url + "/feedback", json={"id": "unknown", "rating": "up"}).status_code == 404


@pytest.mark.slow
def test_collection_off_stores_nothing(home):
    with Server(serve(home, collect=False)) as srv, Store.open(home) as store:
        client = srv.client()
        plain = client.chat.completions.create(model="x", messages=say(3), max_tokens=2)
        list(client.chat.completions.create(model="x", messages=say(4), max_tokens=2, stream=True))
        assert plain.id.startswith("chatcmpl-") and plain.model.startswith("base-")
        assert store.count_items().total == 0 and store.count_rollouts() == 0


@pytest.mark.slow
def test_api_key_and_size_limit(home):
    import httpx2
    import openai

    key = "a-long-enough-serve-key"
    with Server(serve(home, collect=False, api_key=key)) as srv:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong-key").chat.completions.create(model="x", messages=say(5), max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong-key").models.list()
        ok = srv.client(key).chat.completions.create(model="x", messages=say(5), max_tokens=2)
        assert ok.choices[0].finish_reason
        big = httpx2.post(srv.url + "/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
        assert big.status_code == 413 and "bytes" in big.json()["error"]["message"]


def gated_loader(gate: threading.Event, gated: list):
    """Loads real models; the first one's streams pause after their first chunk until `gate` is set, so a
    publish is sure to happen while the stream is in flight."""
    from adapters.llama_runtime import import_llama_cpp
    from daemon.serve_model import load_llama

    llama_cpp = import_llama_cpp()

    class GatedLlama(llama_cpp.Llama):
        def create_completion(self, *args, **kwargs):
            out = super().create_completion(*args, **kwargs)
            if not kwargs.get("stream"):
                return out

            def paused():
                yield next(out)
                assert gate.wait(120)
                yield from out

            return paused()

    def load(path):
        if gated:
            return load_llama(path, n_threads=1)
        gated.append(path)
        return GatedLlama(model_path=str(path), verbose=False, n_threads=1)

    return load


def copy_build(src: Path, exports: Path, name: str) -> Path:
    builds = exports / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, builds / name)
    return builds / name


@pytest.mark.slow
def test_publishing_during_a_stream(home):
    from daemon.serve import build_app
    from edge_unisd.modeling import bundled_model_path

    bundled = bundled_model_path()
    swap_in(copy_build(bundled, home.exports, "v0001-q4_1-a.gguf"), home.exports / "current.gguf")
    gate, gated = threading.Event(), []
    app = build_app(home, collect=True, poll_seconds=0.1, loader=gated_loader(gate, gated))
    with Server(app) as srv, Store.open(home) as store:
        client = srv.client()
        stream = client.chat.completions.create(model="x", messages=say(6), max_tokens=6, stream=True,
                                                extra_body={"min_tokens": 6})
        first = next(iter(stream))
        assert first.model == "v0001-q4_1-a"
        swap_in(copy_build(bundled, home.exports, "v0002-q4_1-b.gguf"), home.exports / "current.gguf")
        deadline = time.monotonic() + 120
        while client.models.list().data[0].version != "v0002-q4_1-b":
            assert time.monotonic() < deadline, "the new version was never loaded"
            time.sleep(0.1)
        assert app.state.switch.draining() == 1  # the stream still uses the old model
        gate.set()
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        assert {c.model for c in rest} == {"v0001-q4_1-a"}  # the whole stream from the old version
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in [first, *rest]) == 6
        assert store.rollouts_for(first.id)[0].adapter_version == "v0001"
        after = client.chat.completions.create(model="x", messages=say(7), max_tokens=2)
        assert after.model == "v0002-q4_1-b"
        assert store.rollouts_for(after.id)[0].adapter_version == "v0002"
        assert app.state.switch.draining() == 0  # closed once the stream ended


@pytest.mark.slow
def test_bounded_load(home):
    import openai

    clients, per_client = 8, 20
    with Server(serve(home, collect=True, limits=ServeLimits(max_active=4))) as srv, Store.open(home) as store:

        def worker(c: int) -> list[tuple[str, str | None]]:
            client = srv.client()
            out = []
            for r in range(per_client):
                try:
                    resp = client.chat.completions.create(model="x", messages=say(f"{c}.{r}"), max_tokens=4)
                    out.append(("ok", resp.id))
                except openai.RateLimitError:
                    out.append(("busy", None))
            return out

        with ThreadPoolExecutor(clients) as pool:
            results = [x for part in pool.map(worker, range(clients)) for x in part]
        answered = [i for kind, i in results if kind == "ok"]
        assert len(results) == clients * per_client and answered  # every request: answered or 429
        items = store.get_items()
        assert sorted(i.id for i in items) == sorted(answered)  # each accepted exchange stored once ...
        assert all(len(store.rollouts_for(i.id)) == 1 for i in items)  # ... with its one completion
        assert store.count_rollouts() == len(answered)
        srv.client().models.list()  # and the server is still there
