"""The catalog on its own: vectors made up in the test, no encoders, no images."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.catalog import DATABASE, INDEX_DIR, MANIFEST, Catalog, ItemSummary, NewItem
from indexer.encoders.base import EncoderSpec, l2_normalise
from indexer.errors import CatalogError, EncoderMismatchError
from indexer.filters import Filters
from indexer.records import DumpRecord
from indexer.vector_index import IndexPolicy, VectorIndex, meets_target
from tests.cli_helpers import run_cli

DIM = 16
SPECS = {
    "visual": EncoderSpec("fake-visual", "fake", "visual", "fake/visual", DIM, "v1"),
    "text": EncoderSpec("fake-text", "fake", "text", "fake/text", 8, "v1"),
}


def make_items(start: int, count: int, rng: np.random.Generator) -> tuple[list[NewItem], dict]:
    items = [
        NewItem(
            record=DumpRecord(
                id=str(i),
                image_path=Path(f"/dump/{i}.png"),
                prompt=f"prompt {i}",
                tags=("red",) if i % 2 == 0 else ("blue", "circle"),
                nsfw_level=i % 4,
                base_model="SDXL 1.0" if i % 3 == 0 else "SD 1.5",
            ),
            file=f"/dump/{i}.png",
            content_hash=f"hash{i}",
            file_size=100 + i,
            file_mtime_ns=i,
            width=64,
            height=64,
        )
        for i in range(start, start + count)
    ]
    vectors = {
        "visual": l2_normalise(rng.normal(size=(count, DIM))),
        "text": l2_normalise(rng.normal(size=(count, 8))),
    }
    return items, vectors


def new_catalog(path: Path, count: int) -> Catalog:
    """A catalog of ``make_items(0, count)``, checkpointed."""
    cat = Catalog.create_or_open(path, SPECS)
    items, vectors = make_items(0, count, np.random.default_rng(0))
    cat.add(items, vectors)
    cat.checkpoint()
    return cat


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return new_catalog(tmp_path / "cat", 40)


def test_search_finds_an_items_own_vector_first(catalog: Catalog) -> None:
    key = catalog.key_for_id("7")
    assert key is not None
    query = catalog.vectors("visual", [key])
    scores, keys = catalog.search("visual", query, 5)
    assert keys[0, 0] == key
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(scores[0]) <= 1e-6)


def test_search_respects_filters_and_exclusions(catalog: Catalog) -> None:
    allowed = catalog.columns.live & (catalog.columns.nsfw_level <= 1)
    query = catalog.vectors("visual", [catalog.key_for_id("3")])
    excluded = {int(catalog.key_for_id("4") or 0), int(catalog.key_for_id("5") or 0)}
    filters = Filters(max_nsfw_level=1)
    _, keys = catalog.search("visual", query, 40, filters=filters, exclude=excluded)
    found = [k for k in keys[0] if k >= 0]
    items = catalog.items(found)
    assert items and all(item.nsfw_level <= 1 for item in items)
    assert not excluded & set(found)
    assert len(found) == int(allowed.sum()) - len(excluded & set(np.flatnonzero(allowed)))


def test_a_filter_mask_is_reused_until_a_write_changes_what_it_allows(catalog: Catalog) -> None:
    no_red = Filters(tags_excluded=("red",))
    mask = catalog.allowed_mask(no_red)
    assert mask is not None and catalog.allowed_mask(no_red) is mask
    assert not mask.flags.writeable  # shared by every search with these filters
    query = catalog.vectors("visual", [catalog.key_for_id("3")])
    _, before = catalog.search("visual", query, 40, filters=no_red)
    three = catalog.key_for_id("3")
    assert three in before[0]
    red = DumpRecord(id="3", image_path=Path("/dump/3.png"), prompt="prompt 3", tags=("red",))
    assert catalog.update_metadata("3", red)
    _, after = catalog.search("visual", query, 40, filters=no_red)
    assert three not in after[0]  # the write rebuilt the mask
    assert catalog.allowed_mask(no_red) is not mask
    # Filters built from a list are the same filters (and hashable: the cache keys on them).
    assert catalog.allowed_mask(Filters(tags_excluded=["red"])) is catalog.allowed_mask(no_red)


def test_exclusions_as_an_array_of_keys_leave_those_out(catalog: Catalog) -> None:
    # How the engine passes a session's seen keys; unknown and negative keys are harmless.
    query = catalog.vectors("visual", [catalog.key_for_id("3")])
    _, all_keys = catalog.search("visual", query, 40)
    seen = np.concatenate([all_keys[0, :15], [-1, 10_000_000]]).astype(np.int64)
    for filters in (None, Filters(max_nsfw_level=3)):
        _, keys = catalog.search("visual", query, 40, filters=filters, exclude=seen)
        found = keys[0][keys[0] >= 0]
        assert not set(found.tolist()) & set(seen.tolist())
        assert len(found) == 25


def test_items_round_trip_metadata_in_requested_order(catalog: Catalog) -> None:
    keys = [catalog.key_for_id(i) for i in ("9", "2")]
    items = catalog.items([k for k in keys if k is not None])
    assert [item.id for item in items] == ["9", "2"]
    assert items[1].tags == ("red",) and items[0].tags == ("blue", "circle")
    assert items[0].base_model == "SDXL 1.0" and items[0].nsfw_name == "Soft"
    assert sorted(catalog.keys_with_tags(["circle"]).tolist()) == sorted(
        k for k in (catalog.key_for_id(str(i)) for i in range(1, 40, 2)) if k is not None
    )


def test_delete_removes_rows_and_vectors_and_survives_reopen(catalog: Catalog) -> None:
    assert catalog.delete(["1", "2", "nope"]) == ["1", "2"]
    assert catalog.item("1") is None
    assert len(catalog) == 38
    assert all(len(index) == 38 for index in catalog.indexes.values())
    path = catalog.path
    catalog.close()
    with Catalog.open(path, expected=SPECS) as reopened:
        assert len(reopened) == 38
        assert reopened.item("1") is None and reopened.item("3") is not None
        assert all(len(index) == 38 for index in reopened.indexes.values())


@pytest.mark.usefixtures("restore_logging")
def test_delete_command_names_the_duplicate_ids_that_go_with_an_item(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = catalog.key_for_id("1")
    assert key is not None
    catalog.add_duplicate("copy-of-1", key, "/dump/copy.png", 10, 0)
    catalog.add_duplicate("copy-of-2", catalog.key_for_id("2") or 0, "/dump/two.png", 10, 0)
    assert catalog.aliases_of(["1", "3"]) == ["copy-of-1"]
    path = catalog.path
    catalog.close()
    assert run_cli(monkeypatch, "delete", "--catalog", str(path), "1", "nope") == 0
    assert capsys.readouterr().out.strip() == (
        "deleted 1 and their duplicate ids copy-of-1; not found: nope"
    )
    with Catalog.open(path) as reopened:
        assert reopened.key_for_id("copy-of-1") is None
        assert reopened.key_for_id("copy-of-2") is not None
    assert run_cli(monkeypatch, "delete", "--catalog", str(path), "nope") == 1


def test_reopen_with_other_encoders_is_refused(catalog: Catalog) -> None:
    catalog.close()
    other = dict(SPECS, visual=EncoderSpec("dinov2", "dinov2", "visual", "x", 384, "main"))
    with pytest.raises(EncoderMismatchError, match="visual: catalog has fake-visual"):
        Catalog.open(catalog.path, expected=other)


def test_stale_faiss_snapshot_is_rebuilt_from_sqlite(tmp_path: Path) -> None:
    cat = Catalog.create_or_open(tmp_path / "cat", SPECS)
    items, vectors = make_items(0, 10, np.random.default_rng(1))
    cat.add(items, vectors)
    cat.checkpoint()
    # A crash after a committed batch but before the next checkpoint.
    more, more_vectors = make_items(10, 5, np.random.default_rng(2))
    cat.add(more, more_vectors)
    cat.close()
    with Catalog.open(tmp_path / "cat") as reopened:
        assert len(reopened) == 15
        assert len(reopened.indexes["visual"]) == 15
        key = reopened.key_for_id("12")
        assert key is not None
        np.testing.assert_allclose(
            reopened.vectors("visual", [key])[0], more_vectors["visual"][2], atol=1e-6
        )
        manifest = json.loads((tmp_path / "cat" / MANIFEST).read_text())
        assert manifest["spaces"]["visual"]["generation"] == reopened.generation()


def test_corrupt_faiss_file_is_rebuilt(catalog: Catalog) -> None:
    catalog.close()
    (catalog.path / INDEX_DIR / "visual.faiss").write_bytes(b"garbage")
    with Catalog.open(catalog.path) as reopened:
        assert len(reopened.indexes["visual"]) == 40


def test_missing_catalog_and_corrupt_manifest_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="lookalike index"):
        Catalog.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(CatalogError, match="Cannot read"):
        Catalog.open(tmp_path / "bad")


def test_replacing_an_id_keeps_its_key(catalog: Catalog) -> None:
    key = catalog.key_for_id("5")
    items, vectors = make_items(5, 1, np.random.default_rng(9))
    assert catalog.add(items, vectors).tolist() == [key]
    assert len(catalog) == 40 and len(catalog.indexes["visual"]) == 40


def test_feedback_is_idempotent_by_event_id(catalog: Catalog) -> None:
    events = [("e1", "3", 1200.0), ("e2", "4", 300.0)]
    fresh, dupes = catalog.record_feedback("s1", None, events)
    assert fresh == [0, 1] and dupes == 0
    fresh, dupes = catalog.record_feedback("s1", None, [("e2", "4", 300.0), ("e3", "5", 10.0)])
    assert fresh == [1] and dupes == 1
    assert [row[2] for row in catalog.feedback_rows()] == ["3", "4", "5"]


def test_close_folds_the_wal_even_while_another_connection_holds_the_database(
    catalog: Catalog,
) -> None:
    """Another connection still open keeps the WAL file; what this one wrote is in the db."""
    other = sqlite3.connect(catalog.path / DATABASE)  # as a second serve worker's would be
    try:
        other.execute("SELECT COUNT(*) FROM items").fetchall()
        catalog.record_feedback("s1", None, [("e1", "3", 1200.0)])
        wal = catalog.path / (DATABASE + "-wal")
        assert wal.stat().st_size > 0
        catalog.close()
        assert wal.stat().st_size == 0  # folded: a copy of catalog.sqlite alone has the event
    finally:
        other.close()


def test_recall_tuning_asks_the_target_of_a_confident_bound_not_of_the_mean() -> None:
    assert meets_target(np.full(200, 0.96), 0.95)
    # mean 0.955 but spread: its bound (0.9498) misses; a sample mean 0.965 as spread passes
    assert not meets_target(np.tile([0.91, 1.0], 100), 0.95)
    assert meets_target(np.tile([0.93, 1.0], 100), 0.95)
    assert not meets_target(np.tile([0.91, 1.0], 10), 0.95 - 0.004)  # fewer queries, wider


def test_large_space_switches_to_ivf_meeting_its_recall_target(tmp_path: Path) -> None:
    policy = IndexPolicy(exact_limit=500, recall_target=0.9, recall_k=20, tuning_queries=50)
    cat = Catalog.create_or_open(tmp_path / "cat", SPECS, policy=policy)
    rng = np.random.default_rng(3)
    # Clustered data, as real embeddings are, so IVF has structure to exploit.
    centres = l2_normalise(rng.normal(size=(20, DIM)))
    for start in range(0, 2000, 500):
        items, vectors = make_items(start, 500, rng)
        vectors["visual"] = l2_normalise(
            centres[rng.integers(0, 20, 500)] + 0.3 * rng.normal(size=(500, DIM))
        )
        cat.add(items, vectors)
    cat.checkpoint()
    info = cat.info()["spaces"]["visual"]
    assert info["index"].startswith("IVF") and info["count"] == 2000
    assert info["measured_recall"] >= 0.9
    cat.close()
    with Catalog.open(tmp_path / "cat", policy=policy) as reopened:
        assert reopened.info()["spaces"]["visual"]["index"] == info["index"]
        query = reopened.vectors("visual", [reopened.key_for_id("42")])
        _, keys = reopened.search("visual", query, 10, exclude={reopened.key_for_id("42")})
        assert reopened.key_for_id("42") not in keys[0].tolist()
        assert (keys[0] >= 0).all()


def test_crash_before_first_manifest_starts_afresh(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / DATABASE).write_bytes(b"half-written")
    cat = Catalog.create_or_open(tmp_path / "cat", SPECS)
    assert len(cat) == 0


def test_ivf_is_retrained_when_the_space_outgrows_its_lists(tmp_path: Path) -> None:
    policy = IndexPolicy(exact_limit=100, recall_target=0.8, recall_k=10, tuning_queries=20)
    cat = Catalog.create_or_open(tmp_path / "cat", SPECS, policy=policy)
    rng = np.random.default_rng(4)
    cat.add(*make_items(0, 200, rng))
    cat.checkpoint()
    first = cat.info()["spaces"]["visual"]
    assert first["index"].startswith("IVF") and first["trained_on"] == 200
    cat.add(*make_items(200, 700, rng))
    cat.checkpoint()
    grown = cat.info()["spaces"]["visual"]
    assert grown["trained_on"] == 900 and grown["index"] != first["index"]


def _clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    centres = l2_normalise(rng.normal(size=(20, DIM)))
    return l2_normalise(centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM)))


def test_use_gpu_builds_through_the_gpu_hand_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU build's plumbing, with FAISS's CPU index standing in for the GPU copy."""
    import faiss

    handed: list[str] = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda r, d, i: handed.append("to") or i)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda i: handed.append("back") or i)
    rng = np.random.default_rng(4)
    vectors = _clustered(rng, 1500).astype(np.float32)
    keys = np.arange(1, 1501, dtype=np.int64)
    policy = IndexPolicy(exact_limit=500, recall_target=0.9, recall_k=20, tuning_queries=50)
    index = VectorIndex(DIM, IndexPolicy(**{**policy.__dict__, "use_gpu": True}))
    index.rebuild(keys, vectors)
    assert handed == ["to", "back"]
    assert index.info.kind.startswith("IVF") and len(index) == 1500
    _, found = index.search(vectors[:1], 5)
    assert found[0, 0] == 1
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)  # no GPU: the CPU build, quietly
    cpu = VectorIndex(DIM, IndexPolicy(**{**policy.__dict__, "use_gpu": True}))
    cpu.rebuild(keys, vectors)
    assert handed == ["to", "back"] and len(cpu) == 1500


@pytest.mark.gpu
def test_gpu_build_matches_the_cpu_build() -> None:
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("FAISS sees no GPU")
    rng = np.random.default_rng(5)
    vectors = _clustered(rng, 30_000).astype(np.float32)
    keys = np.arange(30_000, dtype=np.int64)
    built = {}
    for use_gpu in (False, True):
        index = VectorIndex(DIM, IndexPolicy(exact_limit=1000, use_gpu=use_gpu))
        index.rebuild(keys, vectors)
        built[use_gpu] = index
    assert built[True].info.measured_recall >= 0.95
    _, cpu = built[False].search(vectors[:50], 10)
    _, gpu = built[True].search(vectors[:50], 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu, gpu, strict=True)]) > 0.9


def test_keys_past_the_end_of_an_allowed_mask_are_never_returned() -> None:
    """A key added after a mask was built (past its end) is not allowed, even while the
    packed mask's bytes would cover it."""
    rng = np.random.default_rng(6)
    index = VectorIndex(DIM)
    index.add(np.arange(200, dtype=np.int64), l2_normalise(rng.normal(size=(200, DIM))))
    allowed = np.ones(10, dtype=bool)  # 2 bytes packed; keys 10..199 lie past it
    _, keys = index.search(l2_normalise(rng.normal(size=(1, DIM))), 50, allowed=allowed)
    found = keys[0][keys[0] >= 0]
    assert len(found) == 10 and found.max() < 10


def test_a_space_past_compressed_limit_keeps_its_vectors_on_disk(tmp_path: Path) -> None:
    """Past ``compressed_limit`` a space is rebuilt as a CompressedIndex, streamed out of
    SQLite; it serves searches, survives a reopen and shrinks with deletes."""
    from indexer.compressed_index import CompressedIndex

    policy = IndexPolicy(
        exact_limit=500, compressed_limit=2500, recall_target=0.9, recall_k=20, tuning_queries=50
    )
    cat = Catalog.create_or_open(tmp_path / "cat", SPECS, policy=policy)
    rng = np.random.default_rng(8)
    for start in range(0, 4000, 1000):
        items, vectors = make_items(start, 1000, rng)
        vectors["visual"] = _clustered(rng, 1000)
        cat.add(items, vectors)
        cat.checkpoint()
    assert isinstance(cat.indexes["visual"], CompressedIndex)
    assert len(cat.indexes["visual"]) == 4000
    info = cat.info()["spaces"]["visual"]
    assert info["count"] == 4000 and info["measured_recall"] >= 0.9
    key = cat.key_for_id("42")
    assert key is not None
    query = cat.vectors("visual", [key])
    _, keys = cat.search("visual", query, 10)
    assert keys[0, 0] == key
    cat.close()
    with Catalog.open(tmp_path / "cat", policy=policy) as reopened:
        assert isinstance(reopened.indexes["visual"], CompressedIndex)
        assert not reopened._dirty  # loaded from its snapshot, not rebuilt
        _, again = reopened.search("visual", query, 10, filters=Filters(max_nsfw_level=1))
        assert all(i.nsfw_level <= 1 for i in reopened.items(again[0][again[0] >= 0].tolist()))
        assert reopened.delete(["42"]) == ["42"]
        _, after = reopened.search("visual", query, 10)
        assert key not in after[0]
        assert any((tmp_path / "cat" / "faiss").glob("visual.faiss.*.vectors"))


def test_prompt_terms_are_parsed_when_an_item_is_written(catalog: Catalog) -> None:
    (item,) = catalog.items([catalog.key_for_id("3")])
    assert item.prompt == "prompt 3" and item.prompt_terms == ("prompt",)  # "3" is no term
    changed = DumpRecord(id="3", image_path=Path("/dump/3.png"), prompt="(red hair:1.2), cat")
    assert catalog.update_metadata("3", changed)
    (item,) = catalog.items([catalog.key_for_id("3")])
    assert item.prompt_terms == ("red hair", "cat")


def test_item_summaries_match_the_items_and_follow_writes(catalog: Catalog) -> None:
    keys = [catalog.key_for_id(i) for i in ("9", "gone", "3", "2")]
    wanted = [k for k in keys if k is not None] + [10_000]  # a key that never existed
    terms = catalog.item_summaries(wanted)
    items = catalog.items(wanted)
    fields = ItemSummary._fields
    assert [[getattr(t, f) for f in fields] for t in terms] == [
        [getattr(i, f) for f in fields] for i in items
    ]
    assert [t.key for t in terms] == wanted[:3]  # in order, the missing key left out
    # Both caches follow a metadata update and a delete.
    changed = DumpRecord(id="3", image_path=Path("/dump/3.png"), prompt="cat", tags=("new",))
    assert catalog.update_metadata("3", changed)
    (updated,) = catalog.item_summaries([wanted[1]])
    assert updated.tags == ("new",) and updated.prompt_terms == ("cat",)
    assert catalog.delete(["9"]) == ["9"]
    assert [t.key for t in catalog.item_summaries(wanted)] == wanted[1:3]


def test_a_row_cache_keeps_no_row_read_while_a_write_dropped_it() -> None:
    from indexer.row_cache import RowCache

    store = {1: "old", 2: "two"}
    reads: list[list[int]] = []

    def read(keys: list[int]) -> dict[int, str]:
        reads.append(keys)
        answer = {k: store[k] for k in keys if k in store}
        if len(reads) == 1:  # a write lands while this first read is in flight
            store[1] = "new"
            cache.forget([1])
        return answer

    cache = RowCache(size=2, read=read)
    assert cache.get([1, 2]) == ["old", "two"]  # what the read saw
    assert cache.get([1, 3]) == ["new"]  # not served from the stale read; 3 does not exist
    assert reads == [[1, 2], [1, 3]]
    assert cache.get([1]) == ["new"] and len(reads) == 2  # cached now
    assert cache.get([2]) == ["two"] and len(reads) == 3  # 1 and 2 cached now
    store[4] = "four"
    assert cache.get([4]) == ["four"]  # past size 2: the least recently used (1) goes
    assert cache.get([2, 4]) == ["two", "four"] and len(reads) == 4
    assert cache.get([1]) == ["new"] and len(reads) == 5


def test_an_upgraded_catalog_parses_its_prompts_once_when_opened(catalog: Catalog) -> None:
    """Rows written before the prompt_terms column (NULL), or parsed under an older parser
    version, get their terms at the next open; rows without a prompt get none."""
    import sqlite3

    path = catalog.path
    catalog.close()
    with sqlite3.connect(path / DATABASE) as conn:  # as a catalog from before migration 5
        conn.execute("UPDATE items SET prompt_terms = NULL")
        conn.execute("DELETE FROM state WHERE name = 'prompt_terms_version'")
        conn.execute("UPDATE items SET prompt = NULL WHERE id = '5'")
    reopened = Catalog.open(path)
    items = {i.id: i for i in reopened.items([reopened.key_for_id(str(n)) for n in range(40)])}
    assert items["3"].prompt_terms == ("prompt",) and items["5"].prompt_terms == ()
    reopened.close()
    with sqlite3.connect(path / DATABASE) as conn:
        assert (
            conn.execute("SELECT COUNT(*) FROM items WHERE prompt_terms IS NULL").fetchone()[0] == 0
        )
        conn.execute("UPDATE items SET prompt_terms = '[\"stale\"]'")
        conn.execute("UPDATE state SET value = 0 WHERE name = 'prompt_terms_version'")
    reopened = Catalog.open(path)
    (item,) = reopened.items([reopened.key_for_id("3")])
    assert item.prompt_terms == ("prompt",)  # parsed again under this version's rules
    reopened.close()


def test_an_index_that_no_longer_suits_its_size_is_rebuilt_when_opened(tmp_path: Path) -> None:
    """An index written under other limits (here: exact up to 1000 vectors, now 100) is
    retyped at open, not left to wait for the next write."""
    path = tmp_path / "cat"
    cat = Catalog.create_or_open(path, SPECS, policy=IndexPolicy(exact_limit=1000))
    items, vectors = make_items(0, 600, np.random.default_rng(3))
    cat.add(items, vectors)
    cat.checkpoint()
    assert cat.manifest["spaces"]["visual"]["index"] == "Flat"
    cat.close()
    policy = IndexPolicy(exact_limit=100, recall_target=0.9, recall_k=10, tuning_queries=20)
    reopened = Catalog.open(path, policy=policy)
    assert reopened.manifest["spaces"]["visual"]["index"].startswith("IVF")
    assert json.loads((path / MANIFEST).read_text())["spaces"]["visual"]["index"].startswith("IVF")
    reopened.close()


def test_add_of_an_id_given_twice_keeps_its_last_version(tmp_path: Path) -> None:
    """One key, the last row and tags; its skip and alias rows are cleared."""
    cat = Catalog.create_or_open(tmp_path / "cat", SPECS)
    items, vectors = make_items(0, 3, np.random.default_rng(1))
    cat.record_skip(items[1].file, "corrupt", "test", 1, 1)
    cat.add_duplicate("2", 0, items[2].file, 1, 1)  # "2" was an alias of item 0
    last = NewItem(
        record=DumpRecord(id="1", image_path=Path("/dump/1b.png"), tags=("green",)),
        file="/dump/1b.png",
        content_hash="hash1b",
        file_size=7,
        file_mtime_ns=7,
        width=32,
        height=32,
    )
    keys = cat.add([*items, last], {s: np.vstack([v, v[:1]]) for s, v in vectors.items()})
    assert keys[1] == keys[3] and len(cat) == 3
    item = cat.item("1")
    assert item is not None and item.file == "/dump/1b.png" and item.tags == ("green",)
    assert cat.keys_with_tags(["green"]).tolist() == [keys[1]]
    assert keys[1] not in cat.keys_with_tags(["blue"]).tolist()
    assert cat.file_state(items[1].file) is None  # no longer a skip, and not the item's file
    assert cat.key_for_id("2") == keys[2]  # an item of its own now, not an alias of item 0
    state = cat.file_state(items[2].file)
    assert state is not None and state.kind == "item"


def test_keys_for_ids_answers_many_ids_as_key_for_id_does_one(catalog: Catalog) -> None:
    """Items, a duplicate alias, unknown ids and repeats, in order; more than a batch."""
    of_key = catalog.key_for_id("2")
    assert of_key is not None
    catalog.add_duplicate("alias-of-2", of_key, "/dump/alias-of-2.png", 5, 6)
    ids = ["alias-of-2", "nope", *[str(i) for i in range(40)], "3", "alias-of-2"]
    ids += [f"unknown-{i}" for i in range(600)]
    keys = catalog.keys_for_ids(ids)
    assert keys == [catalog.key_for_id(i) for i in ids]
    assert keys[0] == keys[-601] == of_key and keys[1] is None
    assert catalog.keys_for_ids([]) == []


def test_file_states_answers_many_files_as_file_state_does_one(catalog: Catalog) -> None:
    """An item's file, an alias's file, a skipped file, an unknown one; more than a chunk."""
    of_key = catalog.key_for_id("1")
    assert of_key is not None
    catalog.add_duplicate("alias", of_key, "/dump/alias.png", 5, 6)
    catalog.record_skip("/dump/broken.png", "corrupt", "test", 7, 8)
    files = [f"/dump/{i}.png" for i in range(40)] + ["/dump/alias.png", "/dump/broken.png"]
    files += [f"/nowhere/{i}.png" for i in range(600)]
    states = catalog.file_states(files)
    assert set(states) == set(files[:42])
    assert states == {f: catalog.file_state(f) for f in files[:42]}
    assert [states[f].kind for f in files[39:42]] == ["item", "duplicate", "skipped"]
    assert states["/dump/3.png"].id == "3" and states["/dump/3.png"].file_size == 103
    assert states["/dump/alias.png"].content_hash == "hash1"  # the stored item's bytes
    broken = states["/dump/broken.png"]
    assert broken.id == "corrupt" and broken.file_mtime_ns == 8
