"""Load shedding and the JSON body limit: pure ASGI middleware (no per-request task group, no
Request object), so the cost on the fast path is a few attribute reads.

* `LoadShedder`: at most `max_concurrency` requests are handled at once in this process and at
  most `max_waiting` wait for a slot (first come, first served); past that, and for a request
  that waited `max_wait_s` without a slot, the answer is an immediate 503 `Overloaded` with
  `Retry-After: 1`, before any thread, DB connection or body read is spent on it. A slot is
  held until the response *starts*: a response body streamed afterwards (SSE, downloads) holds
  no slot, since the route's session is closed by then. Liveness (`/healthz`) and the uploads
  (`POST /v1/models`, `POST /v1/datasets`, which have their own caps: inspector concurrency,
  uploads per hour) are exempt.
* `BodyLimit`: a non-multipart request body over `max_bytes` is a 413 naming
  SLIMLINE_MAX_JSON_BYTES: at once from `Content-Length`, and for a chunked body by counting the
  bytes as they arrive (the body is read before the route runs; at most `max_bytes` are kept).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

import anyio.to_thread
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MAX_WAIT_S = 2.0  # a request waits at most this long for a slot, then it is shed
EXEMPT = {("GET", "/healthz"), ("HEAD", "/healthz"), ("POST", "/v1/models"),
          ("POST", "/v1/datasets")}


async def send_error(send: Send, status: int, code: str, detail: str,
                     headers: dict[str, str] | None = None) -> None:
    """One `{"error", "detail"}` JSON response (the shape of api/errors.py)."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class LoadShedder:
    def __init__(self, app: ASGIApp, *, max_concurrency: int, max_waiting: int,
                 max_wait_s: float = MAX_WAIT_S,
                 exempt: Callable[[Scope], bool] | None = None) -> None:
        self.app = app
        self.max_concurrency = max_concurrency
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.exempt = exempt or (lambda scope: (scope["method"], scope["path"]) in EXEMPT)
        self.active = 0  # slots held
        self.waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self.shed = 0  # requests answered 503 so far (for tests and logs)

    # ---- slots ----

    async def acquire(self) -> bool:
        """A slot (True), or False when the queue is full or the wait took too long."""
        if self.active < self.max_concurrency and not self.waiters:
            self.active += 1
            return True
        if len(self.waiters) >= self.max_waiting:
            return False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self.waiters.append(waiter)
        timer = loop.call_later(self.max_wait_s, self._expire, waiter)
        try:
            return await waiter  # True: release() handed this request its slot
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # handed a slot just as the request was cancelled
            else:
                self._forget(waiter)
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            waiter.set_result(False)
            self._forget(waiter)

    def _forget(self, waiter: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)

    def release(self) -> None:
        """Hand the slot to the longest-waiting request, or free it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.active -= 1

    # ---- ASGI ----

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope):
            await self.app(scope, receive, send)
            return
        if not await self.acquire():
            self.shed += 1
            await send_error(
                send, 503, "Overloaded",
                f"the API is at capacity ({self.max_concurrency} requests in progress, "
                f"{self.max_waiting} waiting: SLIMLINE_API_MAX_CONCURRENCY, "
                f"SLIMLINE_API_MAX_WAITING); retry after {RETRY_AFTER_S} s, or run more API "
                "processes",
                {"Retry-After": str(RETRY_AFTER_S)})
            return
        held = True

        async def send_and_release(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start":
                held = False
                self.release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            if held:
                self.release()


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, send: Send, size: str) -> Awaitable[None]:
        return send_error(
            send, 413, "PayloadTooLarge",
            f"the request body is {size} bytes, over the limit of {self.max_bytes} bytes for "
            "JSON bodies (SLIMLINE_MAX_JSON_BYTES): send a smaller document",
            {"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = chunked = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type" and value[:19].lower() == b"multipart/form-data":
                await self.app(scope, receive, send)  # uploads have their own limits
                return
            elif name == b"transfer-encoding":
                chunked = value
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = 0  # the server has refused a malformed Content-Length already
            if declared > self.max_bytes:
                await self._too_large(send, str(declared))
                return
            await self.app(scope, receive, send)  # the server delivers at most `declared`
            return
        if chunked is None:
            await self.app(scope, receive, send)
            return
        # a chunked body: read it here, counting, before the route sees any of it
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send, f"more than {self.max_bytes}")
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


THREAD_HEADROOM = 8  # threads beyond the request slots: exempt routes, SSE polls, background


def size_thread_pool(settings: Settings) -> int:
    """Size the thread pool that sync routes and dependencies run in (call it on the server's
    event loop, at start-up) to the request slots + THREAD_HEADROOM.

    Why: a request's session keeps its DB connection between the thread hops of one request
    (dependencies, route, commit), so with more threads than connections every thread can end
    up waiting for a connection held by a request that waits for a thread (the deadlock of 40
    threads over a pool of 15, until the pool timeout). Here an admitted request always gets a
    thread, so a connection holder always progresses; and with the defaults (8 slots + 8 = 16
    threads, 30 connections) nothing ever waits for a connection at all. Returns the size."""
    tokens = settings.api_max_concurrency + THREAD_HEADROOM
    anyio.to_thread.current_default_thread_limiter().total_tokens = tokens
    capacity = settings.db_pool_size + settings.db_max_overflow
    if tokens > capacity:
        log.warning("SLIMLINE_API_MAX_CONCURRENCY=%d (+%d threads for the rest) is over the %d "
                    "DB connections of this process (SLIMLINE_DB_POOL_SIZE + "
                    "SLIMLINE_DB_MAX_OVERFLOW): requests may wait up to SLIMLINE_DB_POOL_"
                    "TIMEOUT_S for a connection", settings.api_max_concurrency, THREAD_HEADROOM,
                    capacity)
    return tokens


def install_limits(app: Starlette, settings: Settings) -> None:
    """Add the body limit (outside) and the load shedder (inside) to `app`."""
    app.add_middleware(LoadShedder, max_concurrency=settings.api_max_concurrency,
                       max_waiting=settings.api_max_waiting)
    app.add_middleware(BodyLimit, max_bytes=settings.max_json_bytes)
