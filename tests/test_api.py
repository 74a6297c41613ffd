"""HTTP API v1 over a real engine on a tiny offline catalog (sample dump, offline profile).

The catalog is built once per test session; one app serves most tests (each test makes its own
session). Error answers are checked for status *and* the ``{"error": {"code", "message"}}``
shape; hostile uploads must all end in a 4xx.
"""

from __future__ import annotations

import base64
import io
import logging
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.build import open_for_indexing
from indexer.catalog import Catalog, CatalogItem
from indexer.pipeline import PipelineConfig, index_dump
from indexer.sample_dump import write_sample_dump
from service.app import create_app
from service.settings import Settings
from tests.test_api_guards import http_scope

ITEM_FIELDS = {
    "id",
    "url",
    "score",
    "pick",
    "prompt",
    "tags",
    "width",
    "height",
    "nsfw_level",
    "generated",
}
MAX_UPLOAD = 1024 * 1024
MAX_JSON = 64 * 1024


@dataclass(frozen=True)
class TinyCatalog:
    data: Path  # laid out as `lookalike demo` expects: sample-dump/ and demo-catalog/
    catalog: Path
    items: list[CatalogItem]

    def image_bytes(self, item: CatalogItem) -> bytes:
        return Path(item.file).read_bytes()


def build_tiny_catalog(data: Path, count: int, seed: int) -> TinyCatalog:
    """A sample dump and its offline-profile catalog under ``data``."""
    dump, catalog_dir = data / "sample-dump", data / "demo-catalog"
    write_sample_dump(dump, count=count, seed=seed)
    catalog, encoders = open_for_indexing(
        catalog_dir, profile="offline", overrides={}, device="cpu", dtype="fp32"
    )
    with catalog:
        index_dump(dump, catalog, encoders, PipelineConfig(progress=False))
        items = list(catalog.iter_items())
    return TinyCatalog(data, catalog_dir, items)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCatalog:
    return build_tiny_catalog(tmp_path_factory.mktemp("api") / "data", count=60, seed=7)


def settings_for(tiny: TinyCatalog, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "catalog": tiny.catalog,
        "rate_limit_per_s": 0,
        "max_upload_bytes": MAX_UPLOAD,
        "max_json_bytes": MAX_JSON,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def client(tiny: TinyCatalog) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny))) as test_client:
        yield test_client


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def new_search(client: TestClient, tiny: TinyCatalog, **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/search", json={"image_id": tiny.items[0].id, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --------------------------------------------------------------------------- operations


def test_health_ready_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    for _ in range(100):  # the encoders load in the background
        ready = client.get("/readyz")
        if ready.status_code == 200:
            break
        time.sleep(0.1)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    spec = client.get("/openapi.json")
    assert "#/$defs/" not in spec.text  # every schema reference resolves inside the document
    paths = spec.json()["paths"]
    assert {"/v1/search", "/v1/feed", "/v1/feedback", "/knn-service", "/indices-list"} <= set(paths)
    docs = client.get("/docs")
    assert docs.status_code == 200 and 'src="static/api-docs.js"' in docs.text
    assert client.get("/static/api-docs.js").status_code == 200


def test_readyz_is_503_until_the_engine_is_ready(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client.app.state.engine, "ready", lambda: False)  # type: ignore[attr-defined]
    assert_error(client.get("/readyz"), 503, "not_ready")
    assert client.get("/healthz").status_code == 200


def test_metrics(client: TestClient, tiny: TinyCatalog) -> None:
    session = new_search(client, tiny)["session_id"]
    client.get("/v1/feed", params={"session_id": session})
    client.get(f"/v1/images/{tiny.items[0].id}")
    client.get("/v1/feed", params={"session_id": "nope"})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'lookalike_http_request_duration_seconds_bucket{le="0.01",method="GET",route="/v1/feed"}'
        in text
    )
    assert 'route="/v1/images/{image_id:path}"' in text and tiny.items[0].id not in text
    assert 'lookalike_http_requests_total{method="GET",route="/v1/feed",status="404"}' in text
    assert 'lookalike_http_errors_total{code="unknown_session"}' in text
    assert f"lookalike_catalog_items {float(len(tiny.items))}" in text
    assert "lookalike_live_sessions " in text


# --------------------------------------------------------------------------- sessions


def test_create_session(client: TestClient) -> None:
    ids = set()
    for body in ({"user_id": "alice"}, {"user_id": None}, None):
        response = client.post("/v1/sessions", json=body)
        assert response.status_code == 201
        assert set(response.json()) == {"session_id"}
        ids.add(response.json()["session_id"])
    assert len(ids) == 3
    # >= 128 bits: at least 22 URL-safe base64 characters (or 32 hex digits)
    assert all(len(i) >= 22 for i in ids)


def test_session_info_mute_delete(client: TestClient, tiny: TinyCatalog) -> None:
    session = new_search(client, tiny)["session_id"]
    info = client.get(f"/v1/sessions/{session}").json()
    assert set(info) == {"session_id", "served", "feedback_events", "terms"}
    assert info["session_id"] == session and info["served"] > 0
    assert all(set(t) == {"term", "weight"} for t in info["terms"])
    term = info["terms"][0]["term"] if info["terms"] else "red"
    response = client.post(f"/v1/sessions/{session}/mute", json={"term": term})
    assert response.status_code == 204 and response.content == b""
    assert term not in [
        t["term"] for t in client.get(f"/v1/sessions/{session}").json()["terms"] if t["weight"] > 0
    ]
    assert client.delete(f"/v1/sessions/{session}").status_code == 204
    assert_error(client.get(f"/v1/sessions/{session}"), 404, "unknown_session")
    assert_error(client.get("/v1/feed", params={"session_id": session}), 404, "unknown_session")
    assert_error(client.delete(f"/v1/sessions/{session}"), 404, "unknown_session")


def test_engine_bounds_come_from_the_settings(tiny: TinyCatalog) -> None:
    settings = settings_for(tiny, max_sessions=2, max_page=150, max_upload_bytes=30 * 2**20)
    with TestClient(create_app(settings)) as small:
        config = small.app.state.engine.config  # type: ignore[attr-defined]
        # pages and uploads the edge lets through, the engine takes (it kept its defaults)
        assert config.max_page == 150 and config.upload_limits.max_bytes == 30 * 2**20
        first, second, third = (
            small.post("/v1/sessions", json={}).json()["session_id"] for _ in range(3)
        )
        assert_error(small.get(f"/v1/sessions/{first}"), 404, "unknown_session")  # evicted
        assert small.get(f"/v1/sessions/{third}").status_code == 200


def test_session_errors(client: TestClient) -> None:
    assert_error(client.get("/v1/sessions/nope"), 404, "unknown_session")
    assert_error(client.post("/v1/sessions/nope/mute", json={"term": "red"}), 404)
    session = client.post("/v1/sessions", json={}).json()["session_id"]
    assert_error(client.post(f"/v1/sessions/{session}/mute", json={}), 422, "invalid_request")
    assert_error(client.post(f"/v1/sessions/{session}/mute", json={"term": ""}), 422)
    assert_error(client.post("/v1/sessions", json={"user": "typo"}), 422, "invalid_request")


# --------------------------------------------------------------------------- search and feed


def check_items(items: list[dict[str, Any]]) -> None:
    for item in items:
        assert set(item) == ITEM_FIELDS
        assert item["url"] == f"/v1/images/{item['id']}"
        assert item["pick"] in ("top", "explore")
        assert isinstance(item["tags"], list) and isinstance(item["generated"], bool)
        assert item["nsfw_level"] in ("None", "Soft", "Mature", "X", "XXX")


def test_search_by_image_id(client: TestClient, tiny: TinyCatalog) -> None:
    body = new_search(client, tiny)
    assert set(body) == {"session_id", "items", "sparse", "generating"}
    assert 0 < len(body["items"]) <= 20 and isinstance(body["sparse"], bool)
    check_items(body["items"])
    assert tiny.items[0].id not in [i["id"] for i in body["items"]]  # not the query itself
    assert {i["pick"] for i in body["items"]} == {"top", "explore"}


def test_search_by_upload_base64_and_text(client: TestClient, tiny: TinyCatalog) -> None:
    data = tiny.image_bytes(tiny.items[1])
    uploaded = client.post("/v1/search", files={"file": ("x.png", data, "image/png")})
    assert uploaded.status_code == 200, uploaded.text
    check_items(uploaded.json()["items"])
    encoded = client.post("/v1/search", json={"image_b64": base64.b64encode(data).decode()})
    assert encoded.status_code == 200, encoded.text

    def top(body: dict[str, Any]) -> list[str]:  # exploration picks are random per session
        return [i["id"] for i in body["items"] if i["pick"] == "top"]

    assert top(encoded.json()) == top(uploaded.json())
    text = client.post("/v1/search", json={"text": "a red circle, white background"})
    assert text.status_code == 200, text.text
    check_items(text.json()["items"])


def test_search_into_an_existing_session_with_options(
    client: TestClient, tiny: TinyCatalog
) -> None:
    session = client.post("/v1/sessions", json={}).json()["session_id"]
    form = {"session_id": session, "limit": "5", "filters": '{"max_nsfw_level": "None"}'}
    data = tiny.image_bytes(tiny.items[2])
    response = client.post("/v1/search", files={"file": ("a", data)}, data=form)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["session_id"] == session and len(body["items"]) <= 5
    assert all(i["nsfw_level"] == "None" for i in body["items"])
    filters = {"tags_required": [tiny.items[3].tags[0]], "max_nsfw_level": 4}
    tagged = new_search(client, tiny, filters=filters)
    assert all(tiny.items[3].tags[0] in i["tags"] for i in tagged["items"])


def test_search_errors(client: TestClient, tiny: TinyCatalog) -> None:
    assert_error(client.post("/v1/search", json={"image_id": "nope"}), 404, "unknown_image")
    assert_error(
        client.post("/v1/search", json={"image_id": tiny.items[0].id, "session_id": "nope"}),
        404,
        "unknown_session",
    )
    assert_error(client.post("/v1/search", json={}), 422, "invalid_request")
    assert_error(client.post("/v1/search", json={"text": "a", "image_id": tiny.items[0].id}), 422)
    assert_error(client.post("/v1/search", json={"text": "a", "limit": 101}), 422)
    assert_error(client.post("/v1/search", json={"text": "a", "limit": 0}), 422)
    assert_error(
        client.post("/v1/search", json={"text": "a", "filters": {"max_nsfw_level": "R18"}}), 422
    )
    assert_error(client.post("/v1/search", json={"text": "a", "colour": "red"}), 422)
    assert_error(client.post("/v1/search", json={"image_b64": "%%%not base64%%%"}), 422)
    assert_error(
        client.post("/v1/search", content=b"{nope", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_error(client.post("/v1/search", json=[1, 2]), 422, "invalid_request")
    no_file = client.post("/v1/search", files={"other": ("a", b"x")})
    assert_error(no_file, 422, "invalid_request")
    assert_error(client.post("/v1/search", data={"session_id": "x"}), 415)  # urlencoded form


def test_feed_never_repeats_and_runs_dry(client: TestClient, tiny: TinyCatalog) -> None:
    body = new_search(client, tiny)
    session = body["session_id"]
    seen = [i["id"] for i in body["items"]]
    sparse = body["sparse"]
    for _ in range(10):
        page = client.get("/v1/feed", params={"session_id": session})
        assert page.status_code == 200, page.text
        assert set(page.json()) == {"items", "sparse", "generating"}
        check_items(page.json()["items"])
        seen += [i["id"] for i in page.json()["items"]]
        sparse = page.json()["sparse"]
        if not page.json()["items"]:
            break
    assert len(seen) == len(set(seen)), "the feed repeated an item"
    assert len(seen) == len(tiny.items) - 1  # everything but the query image, once
    assert sparse is True
    assert client.get(f"/v1/sessions/{session}").json()["served"] == len(seen)


def test_feed_limit_and_errors(client: TestClient, tiny: TinyCatalog) -> None:
    session = new_search(client, tiny)["session_id"]
    page = client.get("/v1/feed", params={"session_id": session, "limit": 3})
    assert page.status_code == 200 and len(page.json()["items"]) == 3
    assert_error(client.get("/v1/feed", params={"session_id": session, "limit": 0}), 422)
    assert_error(client.get("/v1/feed", params={"session_id": session, "limit": 101}), 422)
    assert_error(client.get("/v1/feed", params={"session_id": session, "limit": "x"}), 422)
    assert_error(client.get("/v1/feed"), 422, "invalid_request")
    assert_error(client.get("/v1/feed", params={"session_id": "nope"}), 404, "unknown_session")
    fresh = client.post("/v1/sessions", json={}).json()["session_id"]
    empty = client.get("/v1/feed", params={"session_id": fresh}).json()
    assert empty == {"items": [], "sparse": True, "generating": False}


# --------------------------------------------------------------------------- feedback


def events_for(items: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [
        {"event_id": f"{prefix}-{n}", "image_id": item["id"], "dwell_ms": 300.0 + 900 * (n % 3)}
        for n, item in enumerate(items)
    ]


def test_feedback_is_idempotent(client: TestClient, tiny: TinyCatalog) -> None:
    body = new_search(client, tiny)
    session, events = body["session_id"], events_for(body["items"][:6], "idem")
    first = client.post("/v1/feedback", json={"session_id": session, "events": events})
    assert first.status_code == 202 and first.json() == {"accepted": 6, "duplicates": 0}
    again = client.post("/v1/feedback", json={"session_id": session, "events": events})
    assert again.status_code == 202 and again.json() == {"accepted": 0, "duplicates": 6}
    more = events[:2] + events_for(body["items"][6:8], "idem-more")
    mixed = client.post("/v1/feedback", json={"session_id": session, "events": more})
    assert mixed.json() == {"accepted": 2, "duplicates": 2}
    assert client.get(f"/v1/sessions/{session}").json()["feedback_events"] == 8


def test_feedback_steers_the_feed(client: TestClient, tiny: TinyCatalog) -> None:
    a, b = new_search(client, tiny), new_search(client, tiny)
    events = [
        {"event_id": f"steer-{n}", "image_id": item["id"], "dwell_ms": 5000.0 if n == 3 else 50.0}
        for n, item in enumerate(a["items"][:8])
    ]
    client.post("/v1/feedback", json={"session_id": a["session_id"], "events": events})
    steered = client.get("/v1/feed", params={"session_id": a["session_id"]}).json()["items"]
    plain = client.get("/v1/feed", params={"session_id": b["session_id"]}).json()["items"]
    assert [i["id"] for i in steered] != [i["id"] for i in plain]


def test_feedback_errors(client: TestClient, tiny: TinyCatalog) -> None:
    session = new_search(client, tiny)["session_id"]
    good = {"event_id": "e", "image_id": tiny.items[0].id, "dwell_ms": 10}

    def post(body: Any) -> Any:
        return client.post("/v1/feedback", json=body)

    assert_error(post({"session_id": "nope", "events": [good]}), 404, "unknown_session")
    for bad in (
        {"session_id": session, "events": []},
        {"session_id": session, "events": [{**good, "dwell_ms": -1}]},
        {"session_id": session, "events": [{**good, "dwell_ms": "long"}]},
        {"session_id": session, "events": [{**good, "event_id": ""}]},
        {"session_id": session, "events": [{"event_id": "e", "image_id": "x"}]},
        {"session_id": session, "events": [{**good, "extra": 1}]},
        {"session_id": session, "events": [good] * 1001},
        {"events": [good]},
    ):
        assert_error(post(bad), 422, "invalid_request")
    nan = b'{"session_id": "%s", "events": [{"event_id": "n", "image_id": "x", "dwell_ms": NaN}]}'
    response = client.post(
        "/v1/feedback", content=nan % session.encode(), headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    too_big = {"session_id": session, "events": [{**good, "event_id": "x" * 100}] * 700}
    assert_error(post(too_big), 413, "body_too_large")
    # an image the catalog does not hold: the whole batch is refused, nothing stored
    junk = {"event_id": "junk", "image_id": "../../nope", "dwell_ms": 10}
    assert_error(post({"session_id": session, "events": [good, junk]}), 404, "unknown_image")
    assert post({"session_id": session, "events": [good]}).json() == {
        "accepted": 1,
        "duplicates": 0,
    }


def test_feedback_is_durable_across_restarts(tiny: TinyCatalog) -> None:
    settings = settings_for(tiny)
    with TestClient(create_app(settings)) as first:
        body = new_search(first, tiny)
        events = events_for(body["items"][:5], "durable")
        response = first.post(
            "/v1/feedback", json={"session_id": body["session_id"], "events": events}
        )
        assert response.json() == {"accepted": 5, "duplicates": 0}
    # A new process would start here: sessions are gone, acknowledged events are not.
    with Catalog.open(tiny.catalog) as catalog:
        stored = [row for row in catalog.feedback_rows() if row[0] == body["session_id"]]
    assert sorted(row[3] for row in stored) == sorted(e["dwell_ms"] for e in events)
    with TestClient(create_app(settings)) as second:
        assert_error(second.get("/v1/feed", params={"session_id": body["session_id"]}), 404)
        session = new_search(second, tiny)["session_id"]
        replay = second.post("/v1/feedback", json={"session_id": session, "events": events})
        assert replay.status_code == 202 and replay.json() == {"accepted": 0, "duplicates": 5}


def test_logs_carry_no_client_address_session_or_dwell(
    client: TestClient, tiny: TinyCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    body = new_search(client, tiny)
    events = [{"event_id": "log-1", "image_id": body["items"][0]["id"], "dwell_ms": 4321.5}]
    with caplog.at_level(logging.DEBUG):
        client.post("/v1/feedback", json={"session_id": body["session_id"], "events": events})
        client.get("/v1/feed", params={"session_id": body["session_id"]})
    access = [r for r in caplog.records if r.name == "service.access"]
    assert access and {getattr(r, "route", None) for r in access} >= {"/v1/feedback", "/v1/feed"}
    ours = ("service", "recommender", "indexer", "uvicorn")  # not the test client's own logs
    for record in (r for r in caplog.records if r.name.startswith(ours)):
        text = record.getMessage() + repr(vars(record))
        assert "testclient" not in text  # TestClient's client address
        assert body["session_id"] not in text and "4321" not in text


# --------------------------------------------------------------------------- images


def test_image_bytes_and_meta(client: TestClient, tiny: TinyCatalog) -> None:
    item = tiny.items[0]
    response = client.get(f"/v1/images/{item.id}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == tiny.image_bytes(item)
    meta = client.get(f"/v1/images/{item.id}/meta").json()
    assert meta["id"] == item.id and meta["url"] == f"/v1/images/{item.id}"
    assert meta["prompt"] == item.prompt and meta["tags"] == list(item.tags)
    assert_error(client.get("/v1/images/nope"), 404, "unknown_image")
    assert_error(client.get("/v1/images/nope/meta"), 404, "unknown_image")
    assert_error(client.get("/v1/images/..%2F..%2Fetc%2Fpasswd"), 404, "unknown_image")
    # HEAD, as uptime checks and proxies send it: the GET's status and headers, no body
    head = client.head(f"/v1/images/{item.id}")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(tiny.image_bytes(item)))
    assert client.head("/healthz").status_code == 200
    assert client.head("/v1/images/nope").status_code == 404
    # not where a GET changes something: a HEAD of /v1/feed would serve the session a page
    session = client.post("/v1/sessions", json={}).json()["session_id"]
    assert client.head("/v1/feed", params={"session_id": session}).status_code == 405


# --------------------------------------------------------------------------- clip-retrieval


def test_knn_service_and_indices_list(client: TestClient, tiny: TinyCatalog) -> None:
    spaces = client.get("/indices-list").json()
    assert spaces == ["visual", "text"]
    data = base64.b64encode(tiny.image_bytes(tiny.items[0])).decode()
    by_image = client.post(
        "/knn-service",
        content=f'{{"image": "{data}", "modality": "image", "num_images": 5, '
        f'"indice_name": "visual", "aesthetic_score": 9, "use_safety_model": true}}',
    )  # no Content-Type, as ClipClient sends it
    assert by_image.status_code == 200, by_image.text
    hits = by_image.json()
    assert len(hits) == 5 and all(set(h) == {"id", "similarity", "url", "caption"} for h in hits)
    assert hits[0]["id"] == tiny.items[0].id and hits[0]["similarity"] > 0.99
    assert hits[0]["url"].endswith(f"/v1/images/{tiny.items[0].id}")
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    by_text = client.post("/knn-service", json={"text": "blue star", "indice_name": "text"})
    assert by_text.status_code == 200 and len(by_text.json()) > 0
    dim = 289
    vector = np.random.default_rng(0).normal(size=dim).tolist()
    by_vector = client.post(
        "/knn-service", json={"embedding_input": vector, "indice_name": "visual", "num_images": 3}
    )
    assert by_vector.status_code == 200 and len(by_vector.json()) == 3


def test_knn_service_errors(client: TestClient) -> None:
    def post(body: dict[str, Any]) -> Any:
        return client.post("/knn-service", json=body)

    assert_error(post({"text": "x", "indice_name": "laion5B"}), 404, "unknown_index")
    assert_error(post({"embedding_input": [0.1] * 7, "indice_name": "visual"}), 422)
    zeros = post({"embedding_input": [0.0] * 289, "indice_name": "visual"})  # no direction
    assert "finite and not all zeros" in assert_error(zeros, 422)["error"]["message"]
    # huge or tiny values are a direction like any other (they overflowed float32 to inf)
    for scale in (1e308, 1e-30):
        got = post({"embedding_input": [scale] * 289, "indice_name": "visual", "num_images": 3})
        assert got.status_code == 200 and len(got.json()) == 3
        assert all(0 < abs(hit["similarity"]) <= 1.0001 for hit in got.json())
    assert_error(post({"image_url": "http://127.0.0.1/x.png"}), 403, "image_url_disabled")
    assert_error(post({}), 422, "invalid_request")
    assert_error(post({"text": "x", "image": "abc"}), 422, "invalid_request")
    assert_error(post({"text": "x", "num_images": 0}), 422, "invalid_request")
    assert_error(post({"image": "%%%"}), 422, "invalid_request")
    assert_error(post({"image": base64.b64encode(b"not an image").decode()}), 415)
    assert_error(client.post("/knn-service", content=b"[1"), 400, "invalid_json")


def test_knn_image_url_refuses_private_addresses_when_enabled(tiny: TinyCatalog) -> None:
    settings = settings_for(tiny, image_url_fetch=True)
    with TestClient(create_app(settings)) as client:
        for url in (
            "http://127.0.0.1:9/x.png",
            "http://localhost/x.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/x.png",
            "http://10.1.2.3/x.png",
        ):
            assert_error(
                client.post("/knn-service", json={"image_url": url}),
                403,
                "image_url_forbidden_address",
            )
        assert_error(
            client.post("/knn-service", json={"image_url": "file:///etc/passwd"}),
            400,
            "image_url_bad_url",
        )


# --------------------------------------------------------------------------- hostile uploads


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def gif_with_frames(frames: int) -> bytes:
    """A 1x1 GIF with ``frames`` frames (an animation bomb is just many of these)."""
    frame = b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00"
    screen = b"\x01\x00\x01\x00\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    return b"GIF89a" + screen + frame * frames + b"\x3b"


def apng_claiming_frames(frames: int) -> bytes:
    """A 2-frame APNG whose acTL chunk claims ``frames`` frames."""
    out = io.BytesIO()
    first, second = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    first.save(out, format="PNG", save_all=True, append_images=[second])
    data = out.getvalue()
    at = data.index(b"acTL") - 4
    patched = png_chunk(b"acTL", struct.pack(">II", frames, 0))
    return data[:at] + patched + data[at + len(patched) :]


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


HOSTILE: dict[str, tuple[bytes, int]] = {
    "zero_bytes": (b"", 400),
    "text": (b"just some words, no pixels at all" * 10, 415),
    "html": (b"<html><script>alert(1)</script></html>", 415),
    "svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', 415),
    "bmp": (encoded(Image.new("RGB", (8, 8)), "BMP"), 415),
    "tiff": (encoded(Image.new("RGB", (8, 8)), "TIFF"), 415),
    "truncated_png": (encoded(Image.new("RGB", (64, 64), "green"), "PNG")[:60], 422),
    "truncated_jpeg": (encoded(Image.linear_gradient("L").convert("RGB"), "JPEG")[:900], 422),
    "pixel_bomb_png": (png_declaring(100_000, 100_000), 413),
    "absurd_side_png": (png_declaring(30_000, 10), 413),
    "gif_frame_bomb": (gif_with_frames(1500), 413),
    "apng_frame_bomb": (apng_claiming_frames(1_000_000), 413),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_uploads_are_4xx(client: TestClient, name: str) -> None:
    data, status = HOSTILE[name]
    upload = client.post("/v1/search", files={"file": ("upload.png", data, "image/png")})
    assert_error(upload, status)
    as_json = client.post("/v1/search", json={"image_b64": base64.b64encode(data).decode()})
    assert_error(as_json, status)
    knn = client.post("/knn-service", json={"image": base64.b64encode(data).decode()})
    assert_error(knn, status)


def test_oversized_and_mislabelled_requests(client: TestClient, tiny: TinyCatalog) -> None:
    big = b"\xff\xd8\xff" + b"\x00" * MAX_UPLOAD
    assert_error(client.post("/v1/search", files={"file": ("a.jpg", big)}), 413, "body_too_large")
    assert_error(
        client.post("/v1/search", content=b"x" * 100, headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(client.post("/v1/search", content=b"x" * 100), 415, "unsupported_media_type")
    data = tiny.image_bytes(tiny.items[0])
    html_part = client.post("/v1/search", files={"file": ("a.html", data, "text/html")})
    assert_error(html_part, 415, "unsupported_media_type")
    assert_error(client.post("/v1/search", files={"file": ("a", data), "file2": ("b", data)}), 400)


def test_deeply_nested_json_is_4xx(client: TestClient) -> None:
    nested = b"[" * 50_000 + b"]" * 50_000
    headers = {"content-type": "application/json"}
    for path in ("/v1/search", "/v1/feedback", "/v1/sessions", "/knn-service"):
        response = client.post(path, content=nested, headers=headers)
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert set(response.json()) == {"error"}


def test_a_body_that_is_not_json_is_400_on_every_route(client: TestClient) -> None:
    session = client.post("/v1/sessions", json={}).json()["session_id"]
    headers = {"content-type": "application/json"}
    paths = ["/v1/search", "/v1/feedback", "/v1/sessions", f"/v1/sessions/{session}/mute"]
    for path in [*paths, "/v1/score", "/knn-service"]:
        response = client.post(path, content=b'{"text": "a"', headers=headers)
        assert_error(response, 400, "invalid_json")


def test_a_client_leaving_mid_body_is_no_server_error(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its connection before its body is complete: no 500 counted, no
    traceback logged (any client could flood the error log and the 5xx metrics)."""
    for path in ("/v1/search", "/knn-service", "/v1/feedback"):
        sent: list[dict[str, Any]] = []

        async def call(path: str = path, sent: list[dict[str, Any]] = sent) -> None:
            headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
            scope = http_scope(path, headers)
            chunks = [{"type": "http.request", "body": b'{"te', "more_body": True}]

            async def receive() -> dict[str, Any]:
                return chunks.pop(0) if chunks else {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await client.app(scope, receive, send)

        with caplog.at_level(logging.INFO):
            client.portal.call(call)  # type: ignore[union-attr]
        started = [m for m in sent if m["type"] == "http.response.start"]
        # 499 where the route reads its body itself; FastAPI's own parsing says 400
        expected = 400 if path == "/v1/feedback" else 499
        assert started and started[0]["status"] == expected, (path, started)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], path
    metrics = client.get("/metrics").text
    assert 'code="internal"' not in metrics and 'status="500"' not in metrics


def test_a_bug_is_a_json_500(
    tiny: TinyCatalog, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "feed", broken)
    with TestClient(create_app(settings_for(tiny), engine), raise_server_exceptions=False) as c:
        response = c.get("/v1/feed", params={"session_id": "x"})
    assert_error(response, 500, "internal")
    assert "a bug" not in response.text


def test_rate_limit(tiny: TinyCatalog, client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    settings = settings_for(tiny, rate_limit_per_s=0.5, rate_limit_burst=3)
    with TestClient(create_app(settings, engine)) as limited:
        statuses = [limited.post("/v1/sessions", json={}).status_code for _ in range(4)]
        assert statuses == [201, 201, 201, 429]
        response = limited.post("/v1/sessions", json={})
        assert_error(response, 429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
        assert limited.get("/healthz").status_code == 200


def test_cors_only_for_configured_origins(tiny: TinyCatalog, client: TestClient) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    with TestClient(create_app(settings_for(tiny), engine)) as closed:
        response = closed.get("/healthz", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
    settings = settings_for(tiny, cors_origins=["https://app.example"])
    with TestClient(create_app(settings, engine)) as open_:
        ok = open_.get("/healthz", headers={"origin": "https://app.example"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = open_.get("/healthz", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# --------------------------------------------------------------------------- CLI


@pytest.mark.usefixtures("restore_logging")
def test_serve_reports_a_missing_catalog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import cli

    monkeypatch.setattr(sys, "argv", ["lookalike", "serve", "--catalog", str(tmp_path / "no")])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert "No catalog at" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_port_in_use_says_so_instead_of_announcing_a_url(
    tiny: TinyCatalog,
    workers: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    from service import cli

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        argv = ["lookalike", "serve", "--catalog", str(tiny.catalog), "--port", port]
        monkeypatch.setattr(sys, "argv", [*argv, "--workers", workers])
        with pytest.raises(SystemExit) as exited:
            cli.main()
    assert exited.value.code == 1
    out = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1 port {port}" in out.err
    assert "serving" not in out.out  # no URL that leads to whatever holds the port


@pytest.mark.usefixtures("restore_logging")
def test_demo_builds_when_missing_then_serves(
    tiny: TinyCatalog, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service import app as service_app
    from service import cli

    served: dict[str, Any] = {}

    def fake_serve(settings: Settings, engine: Any, sock: Any = None) -> None:
        served.update(host=settings.host, port=settings.port)
        with TestClient(service_app.create_app(settings, engine)) as running:
            served["feed"] = running.post("/v1/search", json={"text": "red"}).status_code

    monkeypatch.setattr(service_app, "serve_engine", fake_serve)
    argv = ["lookalike", "demo", "--data", str(tiny.data), "--port", "8765"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code in (0, None)
    out = capsys.readouterr()
    assert "http://127.0.0.1:8765" in out.out
    assert "indexed 0" in out.err  # the catalog was there: nothing rebuilt
    assert served["port"] == 8765 and served["host"] == "127.0.0.1"
    assert served["feed"] == 200
