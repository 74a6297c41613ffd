"""Pure ASGI middlewares: request-body limit, per-client rate limit, request metrics and access log.

They sit outside routing, so they answer before any body is buffered or any route runs; their
answers use the same JSON error shape as the routes (``service.errors.error_body``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BODY_REFUSED, error_body
from service.metrics import Metrics

access_log = logging.getLogger("service.access")

Clock = Callable[[], float]


async def send_error(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """Send a complete JSON error response from ASGI code."""
    body = error_body(code, message)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


# --------------------------------------------------------------------------- HEAD


class HeadAsGetMiddleware:
    """Answer HEAD as the GET of the same URL without its body (status and headers alike),
    on the paths ``safe`` allows: uptime checks, proxies and ``curl -I`` use it, and
    FastAPI's routes take GET only. Not where a GET changes something (``/v1/feed`` serves a
    session its next page): HEAD stays 405 there."""

    def __init__(self, app: ASGIApp, safe: Callable[[str], bool]) -> None:
        self.app = app
        self.safe = safe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or not self.safe(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    await send({"type": "http.response.body", "body": b""})
                return
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


# --------------------------------------------------------------------------- body limit


BODY_IDLE_TIMEOUT_S = 30.0  # the longest wait for the next piece of a request body


class _BodyRefused(Exception):
    """Raised into the app from ``receive`` once the body passed the limit or stalled."""


def _too_large(limit: int) -> str:
    size = f"{limit / 2**20:.3g} MB" if limit >= 2**20 else f"{limit / 2**10:.3g} KB"
    return f"The request is larger than {size} ({limit} bytes), the most this server takes."


class BodyLimitMiddleware:
    """Refuse request bodies over a per-path limit with 413, before they are buffered, and
    bodies that stall with 408.

    A declared ``Content-Length`` over the limit is refused without reading a byte; a body
    streamed without one (chunked) is counted as it arrives and cut off at the limit. A body
    whose next piece takes over ``idle_timeout_s`` to come is given up (a client that declares
    more than it sends would hold its connection, and what it sent, for ever). Whatever the
    app made of the aborted read, the client gets the 413 or the 408.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str], int],
        metrics: Metrics | None = None,
        idle_timeout_s: float = BODY_IDLE_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.metrics = metrics
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(
                    send, 400, "bad_content_length", "Content-Length is not a number"
                )
                return
            if int(declared) > limit:
                await self._refuse_size(send, limit)
                return

        received = 0
        body_done = False
        refusal: tuple[int, str, str] | None = None  # status, code, message
        started = False

        async def counting_receive() -> Message:
            nonlocal received, body_done, refusal
            if refusal is not None:
                raise _BodyRefused
            if body_done:  # a later receive waits for the client to leave: no time limit
                return await receive()
            try:
                async with asyncio.timeout(self.idle_timeout_s):
                    message = await receive()
            except TimeoutError:
                wait = f"{self.idle_timeout_s:g} s"
                refusal = (408, "body_timeout", f"the request body stalled for over {wait}")
            else:
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if received > limit:
                        refusal = (413, "body_too_large", _too_large(limit))
                if refusal is None:
                    return message
            # The app's own error for the aborted read is replaced, and not counted either.
            scope.setdefault("state", {})[BODY_REFUSED] = True
            raise _BodyRefused

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refusal is not None:
                return  # the app's answer to the aborted read is replaced by ours
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not started:
            await self._refuse(send, *refusal)

    async def _refuse_size(self, send: Send, limit: int) -> None:
        await self._refuse(send, 413, "body_too_large", _too_large(limit))

    async def _refuse(self, send: Send, status: int, code: str, message: str) -> None:
        if self.metrics is not None:
            self.metrics.count_error(code)
        # The rest of the body is never read: tell the client the connection ends here.
        await send_error(send, status, code, message, {"connection": "close"})


# --------------------------------------------------------------------------- rate limit


class TokenBuckets:
    """One token bucket per client key, refilled lazily; the least recently seen are dropped.

    ``rate`` tokens per second up to ``burst``; a request costs ``cost`` tokens.
    """

    def __init__(
        self, rate: float, burst: int, max_clients: int, clock: Clock = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens of ``key``'s bucket: 0.0 if allowed, else seconds to wait."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait = (cost - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimitMiddleware:
    """Per-client token-bucket rate limit; over it, 429 with ``Retry-After`` (whole seconds).

    Runs on the event loop only, so the buckets need no lock. ``exempt`` paths (health and
    metrics probes) are never limited; ``cost_for`` prices a request by path.
    """

    def __init__(
        self,
        app: ASGIApp,
        buckets: TokenBuckets,
        *,
        trust_forwarded_for: bool = False,
        exempt: frozenset[str] = frozenset(),
        cost_for: Callable[[str], float] = lambda path: 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.buckets = buckets
        self.trust_forwarded_for = trust_forwarded_for
        self.exempt = exempt
        self.cost_for = cost_for
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(self.client_key(scope), self.cost_for(scope["path"]))
        if wait > 0:
            if self.metrics is not None:
                self.metrics.count_error("rate_limited")
            retry_after = str(max(1, math.ceil(wait)))
            await send_error(
                send,
                429,
                "rate_limited",
                f"too many requests; retry after {retry_after} s",
                {"retry-after": retry_after},
            )
            return
        await self.app(scope, receive, send)

    def client_key(self, scope: Scope) -> str:
        if self.trust_forwarded_for:
            forwarded = _header(scope, b"x-forwarded-for")
            if forwarded:
                # The last hop is the one our trusted proxy added; earlier ones are client-made.
                return forwarded.decode("latin-1").split(",")[-1].strip()
        client = scope.get("client")
        return str(client[0]) if client else "-"


# --------------------------------------------------------------------------- metrics


def route_template(scope: Scope) -> str:
    """The route template a request matched, or ``unmatched`` (bounded label values)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app: Any = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", ())
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


class MetricsMiddleware:
    """Time every HTTP request, count it by route template and status, and log one access line.

    The access line carries method, route template, status and duration: no client address,
    no query string (it holds session ids) and no request body (it holds dwell times).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, clock: Clock = time.perf_counter) -> None:
        self.app = app
        self.metrics = metrics
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self.clock()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            elapsed = self.clock() - start
            route = route_template(scope)
            self.metrics.observe(scope["method"], route, status, elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    route,
                    status,
                    elapsed * 1000,
                    extra={
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
