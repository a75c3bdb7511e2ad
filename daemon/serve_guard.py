"""The door of `edge-unisd serve`: who may ask (401), how much (413) and how many at once (429).

One pure ASGI middleware in front of everything, so every path is covered (including FastAPI's
/docs) and no request reaches the model or the store before it passed. In order:

1. Host header: without an API key the server trusts loopback only, so a Host that is not a
   loopback name is refused (403): a web page using DNS rebinding cannot reach the model (or
   feed the training set) through the user's browser.
2. API key: when one is set, `Authorization: Bearer <key>` (compared in constant time), else 401.
3. Body size: at most `max_body_bytes`, checked on Content-Length and again while reading, else 413.
   The body is read here once and replayed to the app.
4. Concurrency: at most `max_active` model requests running or queued (llama.cpp answers one at a
   time), else 429 at once with Retry-After: a full server says so rather than hanging.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNLIMITED_PATHS = ("/v1/models", "/v1/feedback")  # cheap, no model: never refused for being busy


@dataclass(frozen=True)
class ServeLimits:
    """Bounds of one server. Defaults suit one user's apps on one machine."""

    max_body_bytes: int = 1 << 20  # a 2k-token context is ~10 kB of text; 1 MiB is generous
    max_active: int = 4  # model requests running or waiting for the model; more get 429

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024 or self.max_active < 1:
            raise ValueError(f"invalid serve limits {self}: max_body_bytes >= 1024, max_active >= 1")


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1, `localhost` and `*.localhost` (RFC 6761); brackets around IPv6 allowed."""
    host = host.strip().lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host part of a Host header: `[::1]:8765` -> `[::1]`, `localhost:8765` -> `localhost`."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def send_error(send: Send, status: int, message: str, *, type_: str, code: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An OpenAI-style JSON error (`{"error": {"message", "type", "code", "param"}}`): clients show the message."""
    body = json.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int | None = None) -> bytes:
    """The whole request body; BodyTooLarge past `limit` bytes (then the rest is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then defers to the real one (which reports a disconnect)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str | None, limits: ServeLimits | None = None):
        self.app = app
        self.api_key = api_key
        self.limits = limits or ServeLimits()
        self.active = 0  # changed only on the event loop thread: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # --- 1. host, 2. key
        if self.api_key is None and "host" in headers and not is_loopback_host(_host_of(headers["host"])):
            await send_error(send, 403, "this server answers loopback names only (Host header "
                             f"{headers['host'][:100]!r}); to serve other hosts set serve_api_key in "
                             "settings.toml", type_="permission_error", code="host_not_allowed")
            return
        if self.api_key is not None and not self._authorised(headers.get("authorization", "")):
            await send_error(send, 401, "missing or wrong API key: send the serve_api_key of settings.toml "
                             "as 'Authorization: Bearer <key>'", type_="authentication_error",
                             code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
            return
        # --- 3. size
        limit = self.limits.max_body_bytes
        too_large = (f"request body over {limit} bytes; send a shorter prompt or conversation "
                     "(the model's context window is smaller than this anyway)")
        if headers.get("content-length", "0").isdigit() and int(headers.get("content-length", "0")) > limit:
            await send_error(send, 413, too_large, type_="invalid_request_error", code="request_too_large")
            return
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            await send_error(send, 413, too_large, type_="invalid_request_error", code="request_too_large")
            return
        receive = replay(body, receive)
        # --- 4. concurrency
        if scope["method"] != "POST" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limits.max_active:
            log.info("serve: busy (%d requests active), answered 429", self.active)
            await send_error(send, 429, f"the model is busy ({self.active} requests in progress, the limit is "
                             f"{self.limits.max_active}); retry in a moment", type_="rate_limit_error",
                             code="server_busy", headers=[(b"retry-after", b"1")])
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    def _authorised(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
