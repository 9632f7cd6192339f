"""ASGI middleware of the server: the request-body limit, the API key, and per-request metrics.

Plain ASGI classes (no BaseHTTPMiddleware): they see a request before FastAPI parses it, so an oversized
body answers 413 from its Content-Length or, when streamed without one, as soon as the count passes the
limit, without the body ever being held whole or parsed.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["ApiKey", "BodyLimit", "CountRequests", "OPEN_PATHS"]

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers, liveness probes)


async def _answer(send: Send, status: int, message: str, param: str | None, code: str,
                  headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Answer 413 for a request body over ``max_bytes``; the app gets the body as it was sent."""

    def __init__(self, app: App, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, n: int | str) -> str:
        return (f"the request body is {n} bytes; this server accepts at most {self.max_bytes}. Fix: send a smaller "
                "request (shorter prompts, fewer stop strings), or start the server with a larger --max-body-mb")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _answer(send, 400, "Content-Length is not a number. Fix: send a valid HTTP request",
                                     None, "bad_request")
            if int(length) > self.max_bytes:
                return await _answer(send, 413, self._too_large(int(length)), None, "request_too_large")
        # no (or a small) Content-Length: read the body, counting, before the app sees any of it
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return None
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            more = msg.get("more_body", False)
            if seen > self.max_bytes:
                return await _answer(send, 413, self._too_large(f"over {self.max_bytes}"), None, "request_too_large")
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the disconnect, as the server's receive does

        return await self.app(scope, replay, send)


class ApiKey:
    """``Authorization: Bearer KEY`` on every path but OPEN_PATHS (and CORS preflights); 401 otherwise."""

    def __init__(self, app: App, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            return await _answer(send, 401, "missing or wrong API key. Fix: send the header \"Authorization: Bearer "
                                 "KEY\" with the key the server was started with (--api-key)", None,
                                 "invalid_api_key", ((b"www-authenticate", b"Bearer"),))
        return await self.app(scope, receive, send)


class CountRequests:
    """Calls ``count(path, status)`` once per answered HTTP request (the metrics' request counter)."""

    def __init__(self, app: App, count: Callable[[str, int], None]):
        self.app, self.count = app, count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def watch(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                self.count(scope["path"], int(msg["status"]))
            await send(msg)

        return await self.app(scope, receive, watch)
