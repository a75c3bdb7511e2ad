"""Each served exchange, seen from the outside of llama-cpp-python's routes: which version answered, and,
when the user opted in, the prompt kept as an item and the completion as its rollout.

`ExchangeMiddleware` wraps /v1/chat/completions and /v1/completions (plain and streaming):
- every response's `model` names the version that answered (`ServedVersion.label`);
- with collection on, the prompt is stored as an item (chat messages, source "serve") when the
  request arrives, and the completion as a rollout when it is complete: before the JSON body is
  sent, or before the stream's final `data: [DONE]`. The item id is the response's `id` (every
  chunk's, for a stream) and the `x-edge-unisd-item` header; `POST /v1/feedback` refers to it.
  A request that ends without a complete answer (error, client gone) removes the item it added.
  The same prompt sent again is the same item (the store deduplicates by content) with one more
  rollout; feedback about it concerns its latest served answer.
- storing can fail (disk full, database locked): the user's answer is sent all the same, and the
  failure is logged without any of the prompt's text (that only ever goes to DEBUG).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.exc import StatementError

from daemon.serve_guard import ASGIApp, Message, Receive, Scope, Send, read_body, replay
from daemon.serve_model import ModelSwitch, RequestModel
from daemon.store import Store
from edge_unisd.items import MAX_FIELD_CHARS, IngestRow

log = logging.getLogger(__name__)

SOURCE = "serve"
ITEM_HEADER = b"x-edge-unisd-item"
Kind = Literal["chat", "completion"]
ENDPOINTS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# --- request -> ingest row -----------------------------------------------------------------------

class NotCollectable(ValueError):
    """A request that is served but cannot be an item (tool turns, images, token ids, invalid rows)."""


def _text_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise NotCollectable("a message with non-text content")


def row_from_request(kind: Kind, body: bytes) -> IngestRow:
    """The item a chat or completion request would become; NotCollectable says why not."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise NotCollectable("the body is not JSON") from None
    if not isinstance(req, dict):
        raise NotCollectable("the body is not a JSON object")
    if kind == "chat":
        messages = req.get("messages")
        if not isinstance(messages, list):
            raise NotCollectable("no messages list")
        prompt: Any = []
        for m in messages:
            role = _ROLES.get(m.get("role")) if isinstance(m, dict) else None
            if role is None:
                raise NotCollectable("a message with a role other than system/user/assistant")
            prompt.append({"role": role, "content": _text_content(m.get("content"))})
    else:
        prompt = req.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise NotCollectable("the prompt is not one string")
    try:
        return IngestRow(prompt=prompt, source=SOURCE)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]  # the location and kind only: never the prompt's text
        raise NotCollectable(f"invalid as an item at {'.'.join(map(str, first['loc']))}: {first['type']}") from None


# --- the store, off the event loop ---------------------------------------------------------------

def _why(e: BaseException) -> str:
    """An error in words fit for the log: SQLAlchemy's own message lists the statement's parameters (the
    prompt), so only the database's message is kept."""
    if isinstance(e, StatementError):
        return f"{type(e).__name__}: {e.orig}" if e.orig is not None else type(e).__name__
    return f"{type(e).__name__}: {e}"


class Recorder:
    """Writes of collected exchanges. Every method logs and swallows store errors: they never reach users."""

    def __init__(self, store: Store):
        self.store = store

    async def open(self, row: IngestRow) -> tuple[str | None, bool]:
        """Store the prompt; (item id, whether this request added it) or (None, False) on failure."""
        try:
            result = await anyio.to_thread.run_sync(lambda: self.store.add_items([row], source=SOURCE))
        except Exception as e:  # noqa: BLE001
            log.warning("serve: could not store a collected prompt (%s); the request is served anyway",
                        _why(e))
            return None, False
        item_id = result.item_ids[0]
        if item_id is None:
            log.warning("serve: a collected prompt was not stored: %s", result.outcomes[0])
        return item_id, result.outcomes[0] == "added"

    async def finish(self, item_id: str, completion: str, version: str | None) -> bool:
        try:
            await anyio.to_thread.run_sync(lambda: self.store.record_rollout(item_id, completion, version))
        except Exception as e:  # noqa: BLE001
            log.warning("serve: could not store the completion of item %s (%s)", item_id, _why(e))
            return False
        log.info("serve: collected item %s (%d characters answered by %s)", item_id, len(completion), version)
        return True

    async def abandon(self, item_id: str) -> None:
        """Remove an item this request added when its answer never completed."""
        try:
            with anyio.CancelScope(shield=True):  # also when the client's disconnect cancelled us
                await anyio.to_thread.run_sync(lambda: self.store.forget(ids=[item_id]))
        except Exception as e:  # noqa: BLE001
            log.warning("serve: could not remove the unanswered item %s (%s)", item_id, _why(e))


# --- one exchange --------------------------------------------------------------------------------

@dataclass
class Exchange:
    """The state of one chat/completion request: what was answered, and whether it is stored."""

    kind: Kind
    served: RequestModel
    recorder: Recorder | None
    item_id: str | None = None
    text: list[str] = field(default_factory=list)
    finished: bool = False  # a finish_reason was seen: the answer is complete
    stored: bool = False

    def absorb(self, obj: dict[str, Any], *, streaming: bool) -> dict[str, Any]:
        """Take the answer's text from a response object or chunk; stamp it with the version and item."""
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if self.kind == "completion":
                piece = choice.get("text")
            else:
                piece = (choice.get("delta" if streaming else "message") or {}).get("content")
            if isinstance(piece, str):
                self.text.append(piece)
            if choice.get("finish_reason"):
                self.finished = True
        if self.served.version is not None:
            obj["model"] = self.served.version.label
        if self.item_id is not None:
            obj["id"] = self.item_id
        return obj

    async def store(self) -> None:
        """Keep the completion (once, and only a complete one)."""
        if self.stored or not self.finished or self.item_id is None or self.recorder is None:
            return
        self.stored = True
        version = self.served.version
        await self.recorder.finish(self.item_id, "".join(self.text),
                                   (version.adapter or version.label) if version else None)


class _SSEParser:
    """Splits a server-sent-event byte stream into whole events (`\\n\\n`-separated)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buffer += chunk.replace(b"\r\n", b"\n")
        *events, self.buffer = self.buffer.split(b"\n\n")
        return events


class ExchangeMiddleware:
    def __init__(self, app: ASGIApp, *, switch: ModelSwitch, recorder: Recorder | None):
        self.app = app
        self.switch = switch
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.switch.request_scope() as served:  # every request: tokenize etc. use the model too
            kind = ENDPOINTS.get(scope["path"]) if scope["method"] == "POST" else None
            if kind is None:
                await self.app(scope, receive, send)
                return
            body = await read_body(receive)  # already bounded by the guard
            receive = replay(body, receive)
            ex = Exchange(kind, served, self.recorder)
            added = False
            if self.recorder is not None and _is_json(scope):
                try:
                    row = row_from_request(kind, body)
                except NotCollectable as e:
                    log.info("serve: exchange not collected: %s", e)
                else:
                    log.debug("serve: collecting prompt %r", row.messages())
                    ex.item_id, added = await self.recorder.open(row)
            try:
                await self.app(scope, receive, _ResponseRewriter(ex, send))
            finally:
                if added and not ex.stored and ex.item_id is not None:
                    await self.recorder.abandon(ex.item_id)


def _is_json(scope: Scope) -> bool:
    for k, v in scope.get("headers", []):
        if k.lower() == b"content-type":
            return v.split(b";")[0].strip().lower() == b"application/json"
    return False


class _ResponseRewriter:
    """The `send` the app talks to: stamps the version and item id, stores before the answer ends."""

    def __init__(self, ex: Exchange, send: Send):
        self.ex, self.send = ex, send
        self.start: Message | None = None
        self.streaming = False
        self.ok = False
        self.sse = _SSEParser()
        self.held: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.ok = message["status"] == 200
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streaming = ctype.startswith(b"text/event-stream")
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != ITEM_HEADER]
            if self.ex.item_id is not None and self.ok:
                headers.append((ITEM_HEADER, self.ex.item_id.encode()))
            message = {**message, "headers": headers}
            if self.streaming or not self.ok:
                await self.send(message)
            else:
                self.start = message  # its content-length changes with the body: sent with the body
            return
        if message["type"] != "http.response.body" or not self.ok:
            await self.send(message)
            return
        if self.streaming:
            await self._stream_body(message)
        else:
            await self._json_body(message)

    async def _json_body(self, message: Message) -> None:
        self.held.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self.held)
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            body = json.dumps(self.ex.absorb(obj, streaming=False)).encode()
            await self.ex.store()
        assert self.start is not None
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream_body(self, message: Message) -> None:
        out = []
        for event in self.sse.feed(message.get("body", b"")):
            out.append(await self._event(event) + b"\n\n")
        more = message.get("more_body", False)
        if not more:
            if self.sse.buffer:
                out.append(self.sse.buffer)
            await self.ex.store()  # a stream that ended without [DONE] but complete
        await self.send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    async def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
        if not data:
            return event  # a comment (ping) or an event without data
        if data.strip() == b"[DONE]":
            await self.ex.store()  # before the client learns the answer is over
            return event
        try:
            obj = json.loads(data)
        except ValueError:
            return event
        if not isinstance(obj, dict):
            return event
        rest = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*rest, b"data: " + json.dumps(self.ex.absorb(obj, streaming=True)).encode()])


# --- feedback ------------------------------------------------------------------------------------

class Feedback(BaseModel):
    """`POST /v1/feedback`: about the item a served answer belongs to (its response `id`)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200, description="the item id: the response's `id`")
    rating: Literal["up", "down"] | None = Field(
        None, description="down: the served answer becomes the item's rejected answer; up: its reference, "
                          "unless it has one")
    correction: str | None = Field(None, min_length=1, max_length=MAX_FIELD_CHARS,
                                   description="the answer the user wanted: becomes the item's reference")

    @model_validator(mode="after")
    def _something(self) -> Feedback:
        if self.rating is None and self.correction is None:
            raise ValueError("give a rating (up|down), a correction, or both")
        return self


class FeedbackError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def apply_feedback(store: Store, fb: Feedback) -> dict[str, Any]:
    """Turn feedback into the item's reference / rejected answer. What changed, or FeedbackError (404/409)."""
    items = store.get_items([fb.id])
    if not items:
        raise FeedbackError(404, f"no item {fb.id!r}: it was never collected or has been forgotten")
    item = items[0]
    rollouts = store.rollouts_for(fb.id)
    served = rollouts[-1].completion if rollouts else None
    changed: dict[str, Any] = {"id": fb.id, "reference": False, "rejected": False}
    if fb.rating is not None and served is None:
        raise FeedbackError(409, f"item {fb.id!r} has no served answer to rate; send a correction instead")
    if fb.correction is not None:
        store.set_item_reference(fb.id, fb.correction)
        changed["reference"] = True
    elif fb.rating == "up" and item.reference is None:
        store.set_item_reference(fb.id, served)  # the user accepted it: METHOD.md's privileged view c_0
        changed["reference"] = True
    if fb.rating == "down":
        store.set_item_rejected(fb.id, served)  # the negative teacher's demonstration
        changed["rejected"] = True
    return changed

