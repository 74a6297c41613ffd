"""The generation fallback: the sample backend, the queue's bounds and failures, and the whole
loop (sparse page -> job -> new catalog items -> the session's next pages -> a restart)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.catalog import Catalog
from indexer.pipeline import PipelineConfig, index_dump
from indexer.sample_dump import ATTRIBUTES, write_sample_dump
from recommender.api import FeedbackEvent, ItemQuery, Page
from recommender.engine import Engine, EngineConfig
from recommender.generate import (
    GENERATED_DIR,
    GenerationConfig,
    GenerationQueue,
    SampleBackend,
    build_request,
    make_generator,
)
from recommender.generation_types import GeneratedImage, GenerationRequest
from tests.fakes import fake_encoders, specs

# In-process worker: these engines use the fake encoders, which no child process could rebuild.
THREAD = "thread"
FAST = GenerationConfig(
    images_per_job=6, width=96, height=80, session_interval_s=0.0, worker=THREAD
)


def request_for(terms: tuple[str, ...], seed: int = 3, count: int = 4) -> GenerationRequest:
    return GenerationRequest(
        session_id="s",
        prompt=", ".join(terms),
        terms=terms,
        tags=(),
        count=count,
        width=120,
        height=72,
        seed=seed,
    )


# -- the sample backend ---------------------------------------------------------------------


def test_sample_backend_draws_what_the_terms_name_at_the_requested_size() -> None:
    images = SampleBackend().generate(request_for(("crimson", "orbs", "striped pattern")))
    assert len(images) == 4
    for generated in images:
        assert generated.image.size == (120, 72)
        attrs = generated.conditioning["attributes"]
        assert (attrs["color"], attrs["shape"], attrs["texture"]) == ("red", "circle", "stripes")
        assert "not by an image model" in generated.conditioning["note"]
        assert generated.backend == "sample"
    # unnamed attributes vary between the images of one job
    backgrounds = {g.conditioning["attributes"]["background"] for g in images}
    styles = {g.conditioning["attributes"]["style"] for g in images}
    assert len(backgrounds | styles) > 2


def test_sample_backend_is_deterministic_by_seed() -> None:
    def pixels(seed: int) -> list[bytes]:
        return [g.image.tobytes() for g in SampleBackend().generate(request_for(("blue",), seed))]

    assert pixels(5) == pixels(5)
    assert pixels(5) != pixels(6)


def test_unknown_backend_is_refused_and_none_means_no_generator() -> None:
    assert make_generator("none") is None
    with pytest.raises(ValueError, match="unknown generator"):
        make_generator("dall-e")


# -- fixtures: a small catalog per test (generation writes to it) ----------------------------


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Iterator[Path]:
    write_sample_dump(tmp_path / "dump", count=45, seed=21)
    with Catalog.create_or_open(tmp_path / "catalog", specs()) as catalog:
        index_dump(tmp_path / "dump", catalog, fake_encoders(), PipelineConfig(progress=False))
    yield tmp_path / "catalog"


def open_engine(catalog_dir: Path, generator: GenerationQueue | None) -> Engine:
    return Engine(
        Catalog.open(catalog_dir), fake_encoders(), EngineConfig(), generator=generator, seed=0
    )


def liked(page: Page) -> list[FeedbackEvent]:
    """Long dwell on the first half of the page, fast skips on the rest."""
    half = len(page.items) // 2
    return [
        FeedbackEvent(uuid.uuid4().hex, item.id, 6_000.0 if i < half else 150.0)
        for i, item in enumerate(page.items)
    ]


def scroll_until_sparse(engine: Engine, session_id: str, pages: int = 10) -> tuple[Page, list]:
    served: list[str] = []
    for _ in range(pages):
        page = engine.feed(session_id)
        served += [item.id for item in page.items]
        if page.items:
            engine.feedback(session_id, liked(page))
        if page.sparse:
            return page, served
    raise AssertionError("the scroll never ran dry")


# -- the whole loop -------------------------------------------------------------------------


def test_a_dry_scroll_generates_images_that_lead_the_next_page_and_survive_a_restart(
    catalog_dir: Path,
) -> None:
    queue = GenerationQueue(SampleBackend(), FAST)
    engine = open_engine(catalog_dir, queue)
    before = len(engine.catalog)
    some_id = next(iter(engine.catalog.iter_items())).id
    first = engine.search(ItemQuery(some_id))
    engine.feedback(first.session_id, liked(first))
    served = [some_id] + [item.id for item in first.items]
    sparse_page, more = scroll_until_sparse(engine, first.session_id)
    served += more
    signalled = time.monotonic()
    assert sparse_page.generating, "a sparse page with a generator says generation is pending"
    assert queue.wait_idle(timeout=10)

    page = engine.feed(first.session_id)
    new_items = [item for item in page.items if item.generated]
    assert time.monotonic() - signalled < 2.0  # sparse signal -> new items in the feed
    assert len(new_items) == FAST.images_per_job
    assert page.items[: len(new_items)] == new_items  # they lead the page
    served += [item.id for item in page.items]
    assert len(served) == len(set(served)), "nothing repeats, generated items included"

    catalog = engine.catalog
    assert len(catalog) == before + FAST.images_per_job
    for shown in new_items:
        item = catalog.item(shown.id)
        assert item is not None and item.source == "generated"
        assert (catalog.path / item.file).is_file()
        assert item.file.startswith(f"{GENERATED_DIR}/")
        made = item.meta["generated"]
        assert made["backend"] == "sample"
        assert "not by an image model" in made["conditioning"]["note"]
        assert made["parent_session"] != first.session_id  # a digest, never the credential
        assert item.prompt and (item.width, item.height) == (FAST.width, FAST.height)
    assert queue.stats()["generated_images"] == FAST.images_per_job

    # Deleting a generated item removes its file, which the catalog owns.
    doomed = catalog.item(new_items[-1].id)
    assert doomed is not None and catalog.delete([doomed.id]) == [doomed.id]
    assert not (catalog.path / doomed.file).exists()
    new_items = new_items[:-1]

    # Ordinary items now: another session reaches them through search.
    other = engine.search(ItemQuery(new_items[0].id), limit=40)
    assert any(item.generated for item in other.items)

    assert queue.wait_idle(timeout=10)  # that search ran dry too, and asked for more
    total = len(catalog)
    engine.close()  # writes the FAISS snapshots it owes
    reopened = Catalog.open(catalog_dir)
    try:
        assert len(reopened) == total
        assert all(reopened.item(item.id) is not None for item in new_items)
        for space in reopened.spaces:
            assert len(reopened.indexes[space]) == len(reopened)
        vector = reopened.vectors("visual", [reopened.key_for_id(new_items[0].id) or -1])
        scores, keys = reopened.search("visual", vector, 1)
        assert keys[0, 0] == reopened.key_for_id(new_items[0].id)
    finally:
        reopened.close()


def test_generated_items_survive_a_crash_before_the_snapshot(catalog_dir: Path) -> None:
    # No close: the FAISS snapshot on disk is behind SQLite, as after a kill.
    queue = GenerationQueue(SampleBackend(), FAST)
    engine = open_engine(catalog_dir, queue)
    some_id = next(iter(engine.catalog.iter_items())).id
    first = engine.search(ItemQuery(some_id))
    scroll_until_sparse(engine, first.session_id)
    assert queue.wait_idle(timeout=10)
    count = len(engine.catalog)
    reopened = Catalog.open(catalog_dir)  # a second process opening the same directory
    try:
        assert len(reopened) == count
        assert all(len(reopened.indexes[s]) == count for s in reopened.spaces)
    finally:
        reopened.close()
        queue.close()
        engine.catalog.close()


def test_the_request_carries_the_sessions_taste(catalog_dir: Path) -> None:
    engine = open_engine(catalog_dir, None)
    items = list(engine.catalog.iter_items())
    first = engine.search(ItemQuery(items[0].id))
    top = first.items[0]
    dwell = [FeedbackEvent("e1", top.id, 9_000.0), FeedbackEvent("e2", first.items[1].id, 100.0)]
    engine.feedback(first.session_id, dwell)
    session = engine.sessions.get(first.session_id)
    with session.lock:
        request = build_request(session, engine, FAST, seed=1)
    assert request.terms and request.prompt == ", ".join(request.terms)
    assert request.reference_images[0] == engine.image_path(top.id)  # the longest dwell first
    # Without feedback, the best top picks it was served, best first.
    fresh = engine.search(ItemQuery(items[1].id))
    tops = sorted((item for item in fresh.items if item.pick == "top"), key=lambda i: -i.score)
    session = engine.sessions.get(fresh.session_id)
    with session.lock:
        unsteered = build_request(session, engine, FAST, seed=1)
    assert unsteered.reference_images == tuple(
        engine.image_path(item.id) for item in tops[: len(unsteered.reference_images)]
    )
    assert unsteered.reference_images
    assert set(request.tags) <= set(engine.item(top.id).tags)
    assert request.image_embedding is None  # no clip space in this catalog
    assert (request.width, request.height, request.count) == (96, 80, 6)
    engine.close()


# -- bounds and failures ----------------------------------------------------------------------


class BlockingBackend:
    """Generates nothing until released; counts calls."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def load(self) -> None:
        pass

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]:
        self.calls += 1
        self.release.wait(10)
        return SampleBackend().generate(request)


class FailingBackend:
    name = "failing"

    def __init__(self, fail_load: bool = False) -> None:
        self.fail_load = fail_load

    def load(self) -> None:
        if self.fail_load:
            raise OSError("weights not found: some/model")

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]:
        raise RuntimeError("CUDA out of memory")


def sessions_with_queries(engine: Engine, n: int) -> list[str]:
    ids = [item.id for item in engine.catalog.iter_items()][:n]
    return [engine.search(ItemQuery(i), limit=1).session_id for i in ids]


def test_one_pending_job_per_session_and_a_bounded_queue(catalog_dir: Path) -> None:
    backend = BlockingBackend()
    queue = GenerationQueue(
        backend, GenerationConfig(max_queued=1, session_interval_s=0.0, worker=THREAD)
    )
    engine = open_engine(catalog_dir, queue)
    a, b, c = (engine.sessions.get(s) for s in sessions_with_queries(engine, 3))
    try:
        assert queue.request(a, engine)  # taken by the worker...
        deadline = time.monotonic() + 5
        while backend.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        a.pending_generation = True
        assert queue.request(a, engine)  # ...and still pending: no second job for it
        assert queue.request(b, engine)  # waits in the queue (max 1)
        assert not queue.request(c, engine)  # no room: refused, the feed goes on
        assert queue.stats()["generation_refused"] == 1
    finally:
        backend.release.set()
        assert queue.wait_idle(timeout=10)
        engine.close()
    assert backend.calls == 2


def test_a_session_is_rate_limited_and_budgeted(catalog_dir: Path) -> None:
    clock = [0.0]
    config = GenerationConfig(
        images_per_job=2, session_interval_s=30.0, max_images_per_session=4, worker=THREAD
    )
    queue = GenerationQueue(SampleBackend(), config, clock=lambda: clock[0])
    engine = open_engine(catalog_dir, queue)
    session = engine.sessions.get(sessions_with_queries(engine, 1)[0])
    try:
        assert queue.request(session, engine)
        assert queue.wait_idle(timeout=10)
        clock[0] = 10.0
        assert not queue.request(session, engine)  # within the interval
        clock[0] = 40.0
        assert queue.request(session, engine)
        assert queue.wait_idle(timeout=10)
        clock[0] = 80.0
        assert not queue.request(session, engine)  # 4 images made: the budget is spent
        assert len(session.generated_inbox) == 4
    finally:
        engine.close()


def test_a_failing_backend_is_reported_and_the_service_goes_on(catalog_dir: Path) -> None:
    queue = GenerationQueue(FailingBackend(), FAST)
    engine = open_engine(catalog_dir, queue)
    session_id = sessions_with_queries(engine, 1)[0]
    session = engine.sessions.get(session_id)
    try:
        assert queue.request(session, engine)
        assert queue.wait_idle(timeout=10)
        assert session.generation_error == "RuntimeError: CUDA out of memory"
        assert not session.pending_generation and not session.generated_inbox
        assert queue.stats()["generation_failed"] == 1
        assert engine.feed(session_id).items  # the feed still works
        assert queue.request(session, engine)  # and a later request may try again
    finally:
        queue.wait_idle(timeout=10)
        engine.close()


def test_a_backend_that_cannot_load_refuses_every_request(catalog_dir: Path) -> None:
    queue = GenerationQueue(FailingBackend(fail_load=True), FAST)
    engine = open_engine(catalog_dir, queue)
    session = engine.sessions.get(sessions_with_queries(engine, 1)[0])
    try:
        assert queue.request(session, engine)  # the first request starts the worker
        assert queue.wait_idle(timeout=10)
        assert "weights not found" in (session.generation_error or "")
        assert not queue.request(session, engine)
        assert "weights not found" in (queue.last_error or "")
    finally:
        engine.close()


def test_a_job_past_its_timeout_fails_and_its_images_are_dropped(catalog_dir: Path) -> None:
    backend = BlockingBackend()
    config = GenerationConfig(
        images_per_job=2, timeout_s=0.2, session_interval_s=0.0, worker=THREAD
    )
    queue = GenerationQueue(backend, config)
    engine = open_engine(catalog_dir, queue)
    before = len(engine.catalog)
    session = engine.sessions.get(sessions_with_queries(engine, 1)[0])
    try:
        assert queue.request(session, engine)
        assert queue.wait_idle(timeout=5)
        assert session.generation_error == "timed out after 0.2 s"
        backend.release.set()
    finally:
        engine.close()
    assert len(Catalog.open(catalog_dir)) == before


def test_generated_items_respect_the_sessions_filters(catalog_dir: Path) -> None:
    from recommender.retrieve import Filters

    queue = GenerationQueue(SampleBackend(), FAST)
    engine = open_engine(catalog_dir, queue)
    some = next(iter(engine.catalog.iter_items()))
    page = engine.search(ItemQuery(some.id), filters=Filters(tags_required=("no-such-tag",)))
    session = engine.sessions.get(page.session_id)
    try:
        assert page.sparse and not page.items
        assert queue.wait_idle(timeout=10)
        assert len(session.generated_inbox) == FAST.images_per_job
        assert engine.feed(page.session_id).items == []  # made, but the filter keeps them out
    finally:
        engine.close()


def test_sample_attributes_cover_every_attribute() -> None:
    # The renderer fixes what the terms name and draws the rest from ATTRIBUTES.
    rng_terms = ("teal", "stars")
    (made,) = SampleBackend().generate(request_for(rng_terms, count=1))
    attrs = made.conditioning["attributes"]
    assert set(attrs) == set(ATTRIBUTES)
    assert np.isin(attrs["background"], ATTRIBUTES["background"])


# -- over HTTP ------------------------------------------------------------------------------


def test_the_api_reports_generation_and_serves_the_new_images(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.test_api import build_tiny_catalog

    tiny = build_tiny_catalog(tmp_path / "data", count=30, seed=5)
    settings = Settings(
        catalog=tiny.catalog,
        rate_limit_per_s=0,
        generator="sample",
        generator_images=4,
        generator_interval_s=0,
    )
    with TestClient(create_app(settings)) as client:
        # The worker process runs at SCHED_IDLE (only on otherwise idle cores) and loads its
        # encoders first: on a busy 2-core box that took up to half of a 60 s deadline. The
        # load has its own wait, so that the deadline below times the job.
        generator = client.app.state.engine.generator  # type: ignore[attr-defined]
        assert generator.wait_ready(timeout=300) and generator.last_error is None
        answer = client.post("/v1/search", json={"image_id": tiny.items[0].id}).json()
        session = answer["session_id"]
        seen = [item["id"] for item in answer["items"]]
        generated: list[dict] = []
        saw_pending = answer["generating"]
        deadline = time.monotonic() + 120  # a job at SCHED_IDLE, on a box maybe busy
        while not generated and time.monotonic() < deadline:
            page = client.get("/v1/feed", params={"session_id": session}).json()
            saw_pending = saw_pending or page["generating"]
            seen += [item["id"] for item in page["items"]]
            generated = [item for item in page["items"] if item["generated"]]
            if not page["items"]:
                time.sleep(0.05)
        assert saw_pending and generated
        assert len(seen) == len(set(seen))
        image = client.get(generated[0]["url"])
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        meta = client.get(f"/v1/images/{generated[0]['id']}/meta").json()
        assert meta["generated"] and meta["generation"]["backend"] == "sample"
        assert "lookalike_generated_images_total" in client.get("/metrics").text


def test_the_diffusers_backend_travels_to_the_worker_process_as_its_config() -> None:
    import pickle

    from recommender.generate_diffusers import DiffusersBackend, DiffusersConfig

    backend = DiffusersBackend(DiffusersConfig(model="some/dir", steps=2))
    copy = pickle.loads(pickle.dumps(backend))
    assert isinstance(copy, DiffusersBackend) and copy.config == backend.config


def test_generated_items_get_the_alignment_score_the_indexer_would_store() -> None:
    from indexer.encoders.base import Encoder, EncoderSpec, Vectors, l2_normalise
    from recommender.generate import render_and_encode

    class FakeClip(Encoder):
        """Images and texts into one 8-d space: enough to check the plumbing."""

        def __init__(self) -> None:
            super().__init__(EncoderSpec("fake-clip", "fake", "clip", "fake", 8, "v1"))

        def _load(self) -> None:
            pass

        def embed_batch(self, items: Any) -> Vectors:
            return l2_normalise(np.ones((len(items), 8), dtype=np.float32))

        def embed_texts(self, texts: Any) -> Vectors:
            rows = np.zeros((len(texts), 8), dtype=np.float32)
            rows[:, 0] = 1.0
            return l2_normalise(rows)

    request = request_for(("red", "circle"), count=2)
    made = render_and_encode(SampleBackend(), {"clip": FakeClip()}, request)
    expected = 100.0 / np.sqrt(8)  # cosine of the all-ones image and the e0 text, × 100
    assert [m.alignment for m in made] == pytest.approx([expected, expected], rel=1e-5)
    without = render_and_encode(SampleBackend(), {"visual": fake_encoders()["visual"]}, request)
    assert all(m.alignment is None for m in without)
