"""The engine facade over a small catalog built once per module with the fake encoders."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from indexer.catalog import Catalog, CatalogItem
from indexer.pipeline import PipelineConfig, index_dump
from indexer.sample_dump import write_sample_dump
from recommender.api import FeedbackEvent, ItemQuery, Page, TextQuery
from recommender.engine import Engine, EngineConfig
from recommender.errors import UnknownItemError, UnknownSessionError
from recommender.feedback import BayesConfig, DwellConfig, SteeringConfig
from recommender.rerank import VocabularyConfig
from recommender.retrieve import Filters
from recommender.sessions import SessionConfig
from tests.fakes import fake_encoders, specs

DUMP_SIZE = 140


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    root = tmp_path_factory.mktemp("engine")
    write_sample_dump(root / "dump", count=DUMP_SIZE, seed=11)
    built = Catalog.create_or_open(root / "catalog", specs())
    index_dump(root / "dump", built, fake_encoders(), PipelineConfig(progress=False))
    yield built
    built.close()


@pytest.fixture(scope="module")
def ids(catalog: Catalog) -> list[str]:
    return sorted(item.id for item in catalog.iter_items())


def make_engine(catalog: Catalog, seed: int | None = 0, **config: Any) -> Engine:
    return Engine(catalog, fake_encoders(), EngineConfig(**config), seed=seed)


def events(page: Page, dwell: list[float] | None = None) -> list[FeedbackEvent]:
    """One event per shown item, with fresh ids (event ids are unique per catalog)."""
    dwell = dwell or [1_000.0 + 400.0 * i for i in range(len(page.items))]
    return [
        FeedbackEvent(uuid.uuid4().hex, item.id, d)
        for item, d in zip(page.items, dwell, strict=False)
    ]


def scroll(engine: Engine, first: Page, pages: int) -> list[Page]:
    out = [first]
    for _ in range(pages - 1):
        out.append(engine.feed(first.session_id))
    return out


# --------------------------------------------------------------------------- page shape


def test_a_page_is_15_top_then_5_explore_from_ranks_15_to_50(
    catalog: Catalog, ids: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(catalog, seed=3)
    ranked: list[Any] = []
    rank = engine._rank

    def spy(*args: Any, **kwargs: Any) -> Any:
        ranked.append(rank(*args, **kwargs))
        return ranked[-1]

    monkeypatch.setattr(engine, "_rank", spy)
    explore_ranks: set[int] = set()
    for query in ids[:6]:
        page = engine.search(ItemQuery(query))
        order = {key: r for r, key in enumerate(ranked[-1].pool.keys.tolist())}
        assert len(order) >= 50  # the window exists in full
        keys = [catalog.key_for_id(item.id) for item in page.items]
        picks = [(order[key], item.pick) for key, item in zip(keys, page.items, strict=True)]
        assert len(picks) == 20
        assert sorted(r for r, kind in picks if kind == "top") == list(range(15))
        explore = [r for r, kind in picks if kind == "explore"]
        assert len(explore) == 5 and all(15 <= r < 50 for r in explore)
        assert picks[0][1] == "top"  # explore picks are spread through the page, never first
        for key, item in zip(keys, page.items, strict=True):  # each item's re-ranked score
            assert item.score == pytest.approx(float(ranked[-1].scores[order[key]]), abs=1e-4)
        explore_ranks.update(explore)
    assert len(explore_ranks) > 5  # drawn, not a fixed set of ranks


def test_the_scroll_never_repeats_until_exhausted_then_pages_are_empty_and_sparse(
    catalog: Catalog, ids: list[str]
) -> None:
    engine = make_engine(catalog)
    first = engine.search(ItemQuery(ids[0]))
    served = [item.id for item in first.items]
    for _ in range(len(ids)):
        page = engine.feed(first.session_id)
        if not page.items:
            break
        served += [item.id for item in page.items]
        engine.feedback(first.session_id, events(page))  # steering must not bring repeats
    assert len(served) == len(set(served))
    assert set(served) == set(ids) - {ids[0]}  # everything, once, but the query itself
    for _ in range(2):
        page = engine.feed(first.session_id)
        assert page.items == [] and page.sparse


def test_filters_hold_on_every_page_and_nothing_repeats(catalog: Catalog, ids: list[str]) -> None:
    items = {item.id: item for item in catalog.iter_items()}
    models = sorted({i.base_model for i in items.values() if i.base_model})[:2]
    filters = Filters(
        max_nsfw_level=1,
        base_models=tuple(models),
        tags_required=("geometric",),
        tags_excluded=("red",),
    )

    def allowed(item: CatalogItem) -> bool:
        tags = set(item.tags)
        return (
            item.nsfw_level <= 1
            and item.base_model in models
            and "geometric" in tags
            and "red" not in tags
        )

    expected = {i for i, item in items.items() if allowed(item)}
    assert 20 < len(expected) < len(items)  # the filters bite, and leave more than a page
    engine = make_engine(catalog)
    first = engine.search(ItemQuery(ids[1]), filters=filters)
    served = []
    for page in scroll(engine, first, 8):
        served += [item.id for item in page.items]
        assert all(allowed(items[i]) for i in served)
        if page.items:
            engine.feedback(first.session_id, events(page))
    assert len(served) == len(set(served))
    assert set(served) == expected - {ids[1]}


def test_an_item_query_never_returns_the_query_image(catalog: Catalog, ids: list[str]) -> None:
    engine = make_engine(catalog)
    for query in ids[::15]:
        first = engine.search(ItemQuery(query))
        served = {item.id for page in scroll(engine, first, 3) for item in page.items}
        assert query not in served and len(served) == 60


def count_searches(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``k`` of every ``catalog.search`` call from now on."""
    asked: list[int] = []
    search = catalog.search

    def spy(space: str, queries: Any, k: int, **kwargs: Any) -> Any:
        asked.append(k)
        return search(space, queries, k, **kwargs)

    monkeypatch.setattr(catalog, "search", spy)
    return asked


def test_a_scroll_without_feedback_pages_through_one_deeper_ranking(
    catalog: Catalog, ids: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = count_searches(catalog, monkeypatch)
    engine = make_engine(catalog, seed=4)
    page = engine.search(ItemQuery(ids[9]))
    session = engine.sessions.get(page.session_id)
    served = [item.id for item in page.items]
    for _ in range(2):
        ranking = session.ranking
        assert ranking is not None
        left = [
            (key, round(score, 5))
            for key, score in zip(ranking.keys.tolist(), ranking.scores.tolist(), strict=True)
            if key not in session.seen_keys
        ]
        page = engine.feed(page.session_id)
        shown = [(catalog.key_for_id(item.id), item.score, item.pick) for item in page.items]
        # Not re-ranked: the top picks are the best unseen of the ranking, with its scores,
        # and the explore picks come from its ranks 15-50.
        assert [(key, score) for key, score, pick in shown if pick == "top"] == left[:15]
        explore = {key for key, _, pick in shown if pick == "explore"}
        assert len(explore) == 5 and explore <= {key for key, _ in left[15:50]}
        served += [item.id for item in page.items]
    # 100 candidates ranked: 20 served a page leaves the explore window's 50 for two more
    # pages, then it searches again (one search per query space).
    assert asked == [100, 100]
    served += [item.id for p in scroll(engine, page, 4)[1:] for item in p.items]
    assert asked == [100, 100, 100, 100]
    assert len(served) == 120 == len(set(served))
    # Ranking afresh for every page serves the same first page and then others.
    fresh = make_engine(catalog, seed=4, reuse_ranking=False)
    again = scroll(fresh, fresh.search(ItemQuery(ids[9])), 3)
    assert [i.id for i in again[0].items] == served[:20]
    assert asked[4:] == [100] * 6


def test_feedback_a_mute_or_a_changed_catalog_ranks_again(
    catalog: Catalog, ids: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = count_searches(catalog, monkeypatch)
    engine = make_engine(catalog)
    first = engine.search(ItemQuery(ids[10]))
    engine.feed(first.session_id)
    assert len(asked) == 2  # the second page came from the first search
    engine.feedback(first.session_id, events(first))
    engine.feed(first.session_id)  # steered: a new query
    assert len(asked) == 4
    engine.feed(first.session_id)  # held still since: from that search
    assert len(asked) == 4
    engine.mute(first.session_id, "portrait")
    engine.feed(first.session_id)
    assert len(asked) == 6
    monkeypatch.setattr(Catalog, "revision", property(lambda self: -1))  # a write happened
    engine.feed(first.session_id)
    assert len(asked) == 8


def test_a_page_reads_rows_only_for_the_items_it_shows(
    catalog: Catalog, ids: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-ranking reads its ~100 candidates' terms from the catalog's term column; rows
    (text, size, tags) are read for the page's 20 items alone, searched or not."""
    read: list[list[int]] = []
    original = Catalog.item_summaries

    def counted(self: Catalog, keys: Any) -> Any:
        read.append(list(keys))
        return original(self, keys)

    monkeypatch.setattr(Catalog, "item_summaries", counted)
    engine = make_engine(catalog, seed=2)
    page = engine.search(ItemQuery(ids[12]))
    engine.feedback(page.session_id, events(page))
    read.clear()
    for _ in range(3):  # a steered page that searches, then two from its ranking
        page = engine.feed(page.session_id)
        shown = {catalog.key_for_id(item.id) for item in page.items}
        assert len(read) == 1 and set(read[0]) == shown and len(shown) == 20
        read.clear()


def test_served_records_are_columns_and_cached_summaries_leave_the_cycle_collector(
    catalog: Catalog, ids: list[str]
) -> None:
    """Sessions keep thousands of served records and the catalog caches 100k summaries: a
    full collection that walked each of them stalled every request for a fifth of a second
    at 1M items. Served records are numpy columns; summaries are plain tuples, which the
    collector stops tracking."""
    engine = make_engine(catalog)
    page = engine.search(ItemQuery(ids[3]))
    session = engine.sessions.get(page.session_id)
    gc.collect()
    keys = [catalog.key_for_id(item.id) for item in page.items]
    assert session.served["key"].tolist() == keys
    assert session.served["explore"].tolist() == [item.pick == "explore" for item in page.items]
    assert np.allclose(session.served["score"], [item.score for item in page.items], atol=1e-5)
    rows = catalog._summary_cache.get(keys)  # noqa: SLF001 - what the cache holds
    assert len(rows) == 20 and not any(gc.is_tracked(row) for row in rows)


def test_a_long_scroll_adds_nothing_per_item_for_the_cycle_collector_to_walk(
    catalog: Catalog, ids: list[str]
) -> None:
    """A full collection walks every entry of every tracked container, and every request
    waits meanwhile: what a session keeps per item shown (seen keys, served records,
    feedback events) must be arrays, or a server with many deep scrolls pauses for each
    collection (``benchmarks/gc_pause.py``: 128 sessions shown 2,000 items each, 55 ms a
    collection with them in a set, tuples and objects, 0.1 ms as arrays). The bounded
    windows are shrunk here so that a per-item container stands out."""
    engine = make_engine(
        catalog,
        sessions=SessionConfig(
            dwell=DwellConfig(window=8), vocabulary=VocabularyConfig(max_prompts=8, max_terms=16)
        ),
        steering=SteeringConfig(bayes=BayesConfig(history=8)),
    )
    page = engine.search(ItemQuery(ids[5]))
    for _ in range(5):
        engine.feedback(page.session_id, events(page))
        page = engine.feed(page.session_id)
    session = engine.sessions.get(page.session_id)
    gc.collect()
    assert session.n_served == 120 and session.n_feedback == 100
    assert len(session.seen_keys.array()) == 121  # and the query's own item
    assert session.feedback["key"][-20:].tolist() == session.served["key"][-40:-20].tolist()

    def entries_walked(container: object) -> int:
        return len(gc.get_referents(container))

    walked, todo, done = [], [session], set()
    while todo:  # what the collector walks from the session, short of shared types and code
        obj = todo.pop()
        if id(obj) in done or not gc.is_tracked(obj) or isinstance(obj, type | ModuleType):
            continue
        done.add(id(obj))
        walked.append(obj)
        todo += [ref for ref in gc.get_referents(obj) if not callable(ref)]
    largest = max(walked, key=entries_walked)
    assert entries_walked(largest) < 40, type(largest)


# --------------------------------------------------------------------------- determinism


def test_same_seed_and_same_calls_give_the_same_pages(catalog: Catalog, ids: list[str]) -> None:
    def run(seed: int) -> list[list[tuple[str, str]]]:
        engine = make_engine(catalog, seed=seed)
        out: list[list[tuple[str, str]]] = []
        for query in ids[5:7]:
            page = engine.search(ItemQuery(query))
            for _ in range(3):
                out.append([(item.id, item.pick) for item in page.items])
                dwell = [300.0 + 997.0 * ((7 * i) % 11) for i in range(len(page.items))]
                engine.feedback(page.session_id, events(page, dwell))
                page = engine.feed(page.session_id)
        return out

    first = run(seed=5)
    assert run(seed=5) == first
    assert run(seed=6) != first  # the seed drives the exploration picks


# --------------------------------------------------------------------------- feedback


def test_feedback_is_idempotent_by_event_id(catalog: Catalog, ids: list[str]) -> None:
    engine = make_engine(catalog)
    page = engine.search(ItemQuery(ids[2]))
    batch = events(page, [500.0 + 2_000.0 * (i % 3) for i in range(len(page.items))])
    first = engine.feedback(page.session_id, batch)
    assert (first.accepted, first.duplicates) == (20, 0)
    session = engine.sessions.get(page.session_id)
    steered = {space: q.copy() for space, q in session.query.items()}
    assert any(not np.allclose(steered[s], session.q0[s]) for s in steered)  # it did steer
    again = engine.feedback(page.session_id, batch[:5] + events(page)[:1])
    assert (again.accepted, again.duplicates) == (1, 5)
    assert engine.session_info(page.session_id).feedback_events == 21
    replay = engine.feedback(page.session_id, batch)
    assert (replay.accepted, replay.duplicates) == (0, 20)
    assert engine.session_info(page.session_id).feedback_events == 21
    for space, q in session.query.items():  # a replayed batch does not steer again
        np.testing.assert_array_equal(q, engine.sessions.get(page.session_id).query[space])


def test_feedback_in_two_halves_commits_then_steers(catalog: Catalog, ids: list[str]) -> None:
    """The service commits in a thread and steers on its event loop: the first half stores the
    events without steering, the second steers with them once; a session that ended between
    the two keeps its events."""
    engine = make_engine(catalog)
    page = engine.search(ItemQuery(ids[3]))
    batch = events(page, [500.0 + 2_000.0 * (i % 3) for i in range(len(page.items))])
    session = engine.sessions.get(page.session_id)
    before = {space: q.copy() for space, q in session.query.items()}
    stored = engine.store_feedback(page.session_id, batch)
    assert (len(stored.events), stored.duplicates) == (20, 0)
    rows = [r for r in catalog.feedback_rows() if r[0] == page.session_id]
    assert len(rows) == 20
    for space, q in session.query.items():  # committed, not yet steered
        np.testing.assert_array_equal(q, before[space])
    result = engine.steer_with(stored)
    assert (result.accepted, result.duplicates) == (20, 0)
    assert any(not np.allclose(session.query[s], before[s]) for s in before)
    steered = {space: q.copy() for space, q in session.query.items()}
    engine.steer_with(stored)  # the same events again: each steers once
    for space, q in session.query.items():
        np.testing.assert_array_equal(q, steered[space])
    assert engine.store_feedback(page.session_id, batch).events == ()  # known event ids
    later = engine.store_feedback(page.session_id, events(page)[:3])
    engine.delete_session(page.session_id)
    assert engine.steer_with(later).accepted == 3
    assert len([r for r in catalog.feedback_rows() if r[0] == page.session_id]) == 23


def test_mute_removes_a_term_from_the_session_terms(catalog: Catalog, ids: list[str]) -> None:
    engine = make_engine(catalog)
    page = engine.search(ItemQuery(ids[3]))
    terms = [t for t, _ in engine.session_info(page.session_id).terms]
    assert terms
    engine.mute(page.session_id, terms[0].upper())  # terms are matched normalised
    after = [t for t, _ in engine.session_info(page.session_id).terms]
    assert terms[0] not in after
    engine.feedback(page.session_id, events(page))  # dwelt items carrying it do not re-add it
    assert terms[0] not in [t for t, _ in engine.session_info(page.session_id).terms]


# --------------------------------------------------------------------------- errors, queries


def test_unknown_session_and_unknown_item(catalog: Catalog, ids: list[str]) -> None:
    engine = make_engine(catalog)
    with pytest.raises(UnknownSessionError):
        engine.feed("no-such-session")
    with pytest.raises(UnknownSessionError):
        engine.feedback("no-such-session", [FeedbackEvent(uuid.uuid4().hex, ids[0], 1_000.0)])
    with pytest.raises(UnknownSessionError):
        engine.session_info("no-such-session")
    with pytest.raises(UnknownSessionError):
        engine.search(ItemQuery(ids[0]), session_id="no-such-session")
    with pytest.raises(UnknownItemError):
        engine.search(ItemQuery("no-such-image"))
    with pytest.raises(UnknownItemError):
        engine.item("no-such-image")


def test_a_text_query_works_without_a_clip_space(catalog: Catalog) -> None:
    assert "clip" not in catalog.spaces
    engine = make_engine(catalog)
    first = engine.search(TextQuery("striped blue squares"))
    pages = scroll(engine, first, 2)
    served = [item.id for page in pages for item in page.items]
    assert len(served) == 40 and len(set(served)) == 40
    assert engine.sessions.get(first.session_id).primary == "text"
    # the first page is near the query in the prompt space
    query = engine.encoders["text"].embed_batch(["striped blue squares"])[0]
    keys = [catalog.key_for_id(item.id) for item in first.items]
    near = catalog.vectors("text", [k for k in keys if k is not None]) @ query
    everything = catalog.vectors("text", [i.key for i in catalog.iter_items()]) @ query
    assert float(near.mean()) > float(everything.mean()) + 0.1


def test_sessions_beyond_max_sessions_evict_the_least_recently_used(
    catalog: Catalog, ids: list[str]
) -> None:
    engine = make_engine(catalog, sessions=SessionConfig(max_sessions=2))
    a = engine.search(ItemQuery(ids[0])).session_id
    b = engine.search(ItemQuery(ids[1])).session_id
    engine.feed(a)  # a is now more recently used than b
    c = engine.search(ItemQuery(ids[2])).session_id
    with pytest.raises(UnknownSessionError):
        engine.feed(b)
    assert engine.feed(a).items and engine.feed(c).items
    assert engine.stats()["live_sessions"] == 2
    engine.create_session()  # a was used before c: a goes
    with pytest.raises(UnknownSessionError):
        engine.session_info(a)
    engine.session_info(c)


def test_pages_are_unique_paths_to_existing_files(catalog: Catalog, ids: list[str]) -> None:
    engine = make_engine(catalog)
    page = engine.search(ItemQuery(ids[4]))
    paths = [engine.image_path(item.id) for item in page.items]
    assert all(isinstance(p, Path) and p.is_file() for p in paths)
    assert len(set(paths)) == len(paths)
