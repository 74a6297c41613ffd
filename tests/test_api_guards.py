"""The service's guards on their own: body limit, rate limit, metrics, SSRF-safe fetching.

Each runs on a small app of its own (no catalog, no engine); the URL fetcher talks to a local
HTTP server whose address the test policy allows, to show that everything else is refused.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.types import Message, Scope

from service.errors import UrlFetchError, install_error_handlers
from service.metrics import Metrics
from service.middleware import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    TokenBuckets,
)
from service.netguard import FetchLimits, SafeFetcher, check_url, is_public_address
from service.settings import Settings

LIMIT = 1000


def guarded_app(metrics: Metrics) -> FastAPI:
    app = FastAPI()
    app.state.metrics = metrics
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    @app.post("/json")
    async def json_body(body: dict[str, int]) -> dict[str, int]:  # parsed by FastAPI
        return {"keys": len(body)}

    @app.post("/form")
    async def form(request: Request) -> dict[str, int]:
        data = await request.form()
        return {"fields": len(data)}

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: LIMIT, metrics=metrics)
    app.add_middleware(
        RateLimitMiddleware,
        buckets=TokenBuckets(rate=1.0, burst=3, max_clients=10),
        exempt=frozenset({"/healthz"}),
        metrics=metrics,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(guarded_app(Metrics())) as test_client:
        yield test_client


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code


def http_scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    """An ASGI scope of a POST to ``path`` (default headers: a 1000-byte body declared)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-length", b"1000")] if headers is None else headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }


# --------------------------------------------------------------------------- body limit


def test_body_under_the_limit_passes(client: TestClient) -> None:
    assert client.post("/echo", content=b"x" * LIMIT).json() == {"received": LIMIT}


def test_declared_length_over_the_limit_is_refused_unread(client: TestClient) -> None:
    assert_error(client.post("/echo", content=b"x" * (LIMIT + 1)), 413, "body_too_large")


def test_streamed_body_over_the_limit_is_cut_off() -> None:
    """Driven at the ASGI level: TestClient buffers a body before the app sees it."""
    app = guarded_app(Metrics())
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> Message:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"y" * 100, "more_body": pulled < 1000}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    async def call() -> None:
        await app(http_scope("/echo", [(b"transfer-encoding", b"chunked")]), receive, send)

    anyio.run(call)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert b"body_too_large" in sent[1]["body"]
    assert pulled == LIMIT // 100 + 1  # reading stopped at the limit, not at 100 kB


def test_a_body_that_stalls_is_given_up_with_408() -> None:
    """A client that declares more than it sends held its connection for ever."""
    metrics = Metrics()
    app = guarded_app(metrics)
    app.add_middleware(
        BodyLimitMiddleware, limit_for=lambda path: LIMIT, metrics=metrics, idle_timeout_s=0.2
    )
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": b"{", "more_body": True}]

    async def receive() -> Message:
        if chunks:
            return chunks.pop()
        await anyio.sleep(3600)  # the rest never comes
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(dict(message))

    async def call() -> None:
        with anyio.fail_after(5):
            await app(http_scope("/json"), receive, send)

    anyio.run(call)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    assert b"body_timeout" in sent[1]["body"]
    # counted once, as what the client got (not also as the app's error for the cut read)
    counted = [
        line for line in metrics.render()[0].decode().splitlines() if "errors_total{" in line
    ]
    assert len(counted) == 1 and 'code="body_timeout"' in counted[0], counted


def test_waiting_for_the_client_after_the_body_is_not_timed() -> None:
    """Once the body is in, a receive waits for the client to leave (streamed answers do)."""
    sent: list[dict[str, Any]] = []

    async def inner(scope: Scope, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        assert (await receive())["type"] == "http.disconnect"  # after longer than the limit
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    messages = [
        {"type": "http.request", "body": b"x", "more_body": True},
        {"type": "http.request", "body": b"y", "more_body": False},
    ]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await anyio.sleep(0.5)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    guarded = BodyLimitMiddleware(inner, limit_for=lambda path: LIMIT, idle_timeout_s=0.2)
    anyio.run(guarded, http_scope("/x"), receive, send)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"done"


def test_streamed_multipart_over_the_limit_is_413_not_400(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n'
        for _ in range(100):
            yield b"z" * 100

    response = client.post(
        "/form", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert_error(response, 413, "body_too_large")


def test_bad_content_length_is_400(client: TestClient) -> None:
    response = client.post("/echo", content=b"abc", headers={"content-length": "abc"})
    assert_error(response, 400, "bad_content_length")


# --------------------------------------------------------------------------- rate limit


def test_token_bucket_refills_over_time() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, max_clients=2, clock=lambda: now[0])
    assert buckets.take("a") == 0 and buckets.take("a") == 0
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("a") == 0
    buckets.take("b")
    buckets.take("c")
    assert len(buckets) == 2  # the least recently seen client is dropped


def test_rate_limit_answers_429_with_retry_after(client: TestClient) -> None:
    statuses = [client.get("/items/1").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    response = client.get("/items/1")
    assert_error(response, 429, "rate_limited")
    assert int(response.headers["retry-after"]) >= 1
    assert client.get("/healthz").status_code == 200  # probes are never limited


def test_forwarded_for_is_used_only_when_trusted() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_clients=10)
    scope = {"client": ("10.0.0.1", 1), "headers": [(b"x-forwarded-for", b"1.2.3.4, 5.6.7.8")]}
    trusting = RateLimitMiddleware(FastAPI(), buckets, trust_forwarded_for=True)
    assert trusting.client_key(scope) == "5.6.7.8"
    assert RateLimitMiddleware(FastAPI(), buckets).client_key(scope) == "10.0.0.1"


# --------------------------------------------------------------------------- metrics


def test_metrics_use_route_templates_and_count_errors() -> None:
    metrics = Metrics()
    with TestClient(guarded_app(metrics)) as client:
        client.get("/items/abc")
        client.get("/items/def")
        client.post("/echo", content=b"x" * (LIMIT + 1))
        client.get("/nowhere")
    text = metrics.render()[0].decode()
    assert 'route="/items/{item_id}"' in text and "abc" not in text
    assert (
        'lookalike_http_requests_total{method="GET",route="/items/{item_id}",status="200"} 2.0'
        in text
    )
    assert 'lookalike_http_errors_total{code="body_too_large"} 1.0' in text
    assert 'route="unmatched"' in text
    assert "lookalike_http_request_duration_seconds_bucket" in text


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/echo"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- settings


def test_settings_refuse_a_wildcard_cors_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="explicitly"):
        Settings.model_validate({"cors_origins": ["*"]})
    monkeypatch.setenv("LOOKALIKE_CORS_ORIGINS", "https://a.example,*")
    with pytest.raises(ValueError, match="explicitly"):
        Settings()


def test_cors_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a person types (one origin, a comma-separated list) as well as a JSON list; it
    failed with a traceback from pydantic-settings' JSON parsing of list fields."""
    for text, origins in (
        ("https://a.example", ["https://a.example"]),
        (
            " https://a.example, https://b.example:8443 ",
            ["https://a.example", "https://b.example:8443"],
        ),
        ('["https://c.example"]', ["https://c.example"]),
        ("", []),
    ):
        monkeypatch.setenv("LOOKALIKE_CORS_ORIGINS", text)
        assert Settings().cors_origins == origins


# --------------------------------------------------------------------------- SSRF guard


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.100.100.200",  # Alibaba metadata (CGNAT range)
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00:ec2::254",  # AWS metadata over IPv6
        "::ffff:127.0.0.1",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "224.0.0.1",
        "not-an-ip",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(address)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/a.png", "file:///etc/passwd", "http://user:pw@example.com/", "/relative"],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(UrlFetchError) as caught:
        check_url(url)
    assert caught.value.reason == "bad_url"


class _Handler(http.server.BaseHTTPRequestHandler):
    redirect_to = ""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/image.png":
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"\x89PNG\r")
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"b" * 5000)
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", type(self).redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_loopback_is_refused_by_default(local_server: str) -> None:
    fetcher = SafeFetcher(FetchLimits(max_bytes=1000))
    with pytest.raises(UrlFetchError) as caught:
        fetcher.fetch(local_server + "/image.png")
    assert caught.value.reason == "forbidden_address"
    with pytest.raises(UrlFetchError) as caught:
        fetcher.fetch(local_server.replace("127.0.0.1", "localhost") + "/image.png")
    assert caught.value.reason == "forbidden_address"


def only_127_0_0_1(address: str) -> bool:
    return address == "127.0.0.1"


def test_allowed_address_is_fetched(local_server: str) -> None:
    fetcher = SafeFetcher(FetchLimits(max_bytes=1000), allow=only_127_0_0_1)
    assert fetcher.fetch(local_server + "/image.png") == b"\x89PNG\r"


@pytest.mark.parametrize(
    "target", ["http://127.0.0.2/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/"]
)
def test_redirect_to_a_forbidden_address_is_refused(local_server: str, target: str) -> None:
    _Handler.redirect_to = target
    fetcher = SafeFetcher(FetchLimits(max_bytes=1000), allow=only_127_0_0_1)
    with pytest.raises(UrlFetchError) as caught:
        fetcher.fetch(local_server + "/redirect")
    assert caught.value.reason == "forbidden_address"


def test_hostname_resolving_to_a_forbidden_address_is_refused(local_server: str) -> None:
    port = local_server.rsplit(":", 1)[1]
    fetcher = SafeFetcher(
        FetchLimits(max_bytes=1000),
        allow=only_127_0_0_1,
        resolver=lambda host, port: ["127.0.0.1", "10.0.0.7"],  # one bad answer is enough
    )
    with pytest.raises(UrlFetchError) as caught:
        fetcher.fetch(f"http://images.example:{port}/image.png")
    assert caught.value.reason == "forbidden_address"


def test_size_redirect_and_status_limits(local_server: str) -> None:
    fetcher = SafeFetcher(FetchLimits(max_bytes=1000, max_redirects=2), allow=only_127_0_0_1)
    for path, reason in (("/big", "too_large"), ("/loop", "too_many_redirects")):
        with pytest.raises(UrlFetchError) as caught:
            fetcher.fetch(local_server + path)
        assert caught.value.reason == reason
    with pytest.raises(UrlFetchError) as caught:
        fetcher.fetch(local_server + "/missing")
    assert caught.value.reason == "http_error"
