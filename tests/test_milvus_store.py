"""The Milvus vector store (on Milvus Lite, in process) against the FAISS one on the same data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from indexer.catalog import MANIFEST, Catalog
from indexer.errors import CatalogError
from indexer.filters import Filters
from indexer.merge import merge_catalogs
from indexer.milvus_store import MilvusStore, milvus_filter
from indexer.pipeline import PipelineConfig, Shard, index_dump
from indexer.records import DumpRecord
from indexer.sample_dump import write_sample_dump
from indexer.vector_store import MILVUS_LITE_FILE, StoreConfig
from recommender.api import FeedbackEvent, ItemQuery
from recommender.engine import Engine, EngineConfig
from tests.cli_helpers import run_cli
from tests.fakes import fake_encoders, specs
from tests.test_catalog import SPECS, make_items

MILVUS = StoreConfig("milvus")
FILTER_CASES = [
    Filters(),
    Filters(max_nsfw_level=1),
    Filters(base_models=("SDXL 1.0",)),
    Filters(tags_required=("red",)),
    Filters(tags_required=("blue", "circle"), max_nsfw_level=2),
    Filters(tags_excluded=("red",)),
    Filters(min_alignment=20.0),
    Filters(base_models=("no such model",)),
]


def build(path: Path, store: StoreConfig | None, count: int = 300) -> Catalog:
    catalog = Catalog.create_or_open(path, SPECS, store=store)
    items, vectors = make_items(0, count, np.random.default_rng(0))
    keys = catalog.add(items, vectors)
    scored = keys[::3]
    catalog.set_alignment(scored.tolist(), [float(k % 40) for k in scored])
    catalog.checkpoint()
    return catalog


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Catalog, Catalog]]:
    root = tmp_path_factory.mktemp("stores")
    faiss_catalog, milvus_catalog = build(root / "faiss", None), build(root / "milvus", MILVUS)
    yield faiss_catalog, milvus_catalog
    faiss_catalog.close()
    milvus_catalog.close()


def test_a_milvus_catalog_keeps_its_vectors_in_milvus_lite(pair: tuple[Catalog, Catalog]) -> None:
    _, milvus_catalog = pair
    manifest = json.loads((milvus_catalog.path / MANIFEST).read_text())
    assert manifest["vector_store"]["kind"] == "milvus"
    assert manifest["vector_store"]["collection_prefix"].startswith("lookalike_")
    assert "token" not in manifest["vector_store"]
    assert (milvus_catalog.path / MILVUS_LITE_FILE).exists()
    assert isinstance(milvus_catalog.indexes["visual"], MilvusStore)
    assert milvus_catalog.info()["spaces"]["visual"]["count"] == 300


@pytest.mark.parametrize("filters", FILTER_CASES, ids=str)
def test_both_stores_give_the_same_top_k(pair: tuple[Catalog, Catalog], filters: Filters) -> None:
    faiss_catalog, milvus_catalog = pair
    queries = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    seen = {3, 4, 10, 11, 12}
    for query in queries:
        f_scores, f_keys = faiss_catalog.search(
            "visual", query[None], 25, filters=filters, exclude=seen
        )
        m_scores, m_keys = milvus_catalog.search(
            "visual", query[None], 25, filters=filters, exclude=seen
        )
        np.testing.assert_array_equal(m_keys, f_keys)
        found = f_keys >= 0
        np.testing.assert_allclose(m_scores[found], f_scores[found], atol=1e-5)
        assert not seen & set(m_keys[0].tolist())
    if filters.base_models == ("no such model",):
        assert (m_keys == -1).all()


def test_vectors_read_back_from_milvus(pair: tuple[Catalog, Catalog]) -> None:
    faiss_catalog, milvus_catalog = pair
    keys = [5, 1, 250]
    np.testing.assert_allclose(
        milvus_catalog.vectors("text", keys), faiss_catalog.vectors("text", keys), atol=1e-6
    )


def test_metadata_changes_and_deletes_reach_milvus(tmp_path: Path) -> None:
    with build(tmp_path / "cat", MILVUS, count=60) as catalog:
        key = catalog.key_for_id("7")
        assert key is not None
        query = catalog.vectors("visual", [key])
        record = DumpRecord(
            id="7",
            image_path=Path("/dump/7.png"),
            tags=('say "cheese"', "ünïcode\\"),
            nsfw_level=4,
        )
        assert catalog.update_metadata("7", record)
        for filters, present in [
            (Filters(tags_required=('say "cheese"',)), True),
            (Filters(tags_required=("ünïcode\\",)), True),
            (Filters(max_nsfw_level=3), False),
            (Filters(min_alignment=0.0), False),  # its score went with the old metadata
        ]:
            _, keys = catalog.search("visual", query, 5, filters=filters)
            assert (key in keys[0]) is present, filters
        catalog.set_alignment([key], [99.0])
        _, keys = catalog.search("visual", query, 1, filters=Filters(min_alignment=98.0))
        assert keys[0, 0] == key
        assert catalog.delete(["7"]) == ["7"]
        _, keys = catalog.search("visual", query, 60)
        assert key not in keys[0]
        assert len(catalog.indexes["visual"]) == 59


def test_reopening_uses_the_collection_and_catches_up_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "cat"
    catalog = build(path, MILVUS, count=50)
    query = catalog.vectors("visual", [catalog.key_for_id("0")])
    before = catalog.search("visual", query, 10)
    catalog.close()
    with Catalog.open(path) as reopened:
        assert not reopened._dirty  # opened as saved: nothing rebuilt
        np.testing.assert_array_equal(reopened.search("visual", query, 10)[1], before[1])
        # A write that reaches SQLite but is never checkpointed (a crash) leaves the
        # manifest's generation behind: the next open rebuilds the collection from SQLite.
        items, vectors = make_items(50, 5, np.random.default_rng(5))
        reopened.add(items, vectors)
        reopened.indexes["visual"].remove([51, 52])  # the store lost part of the write
    with Catalog.open(path) as recovered:
        assert len(recovered.indexes["visual"]) == 55
        assert recovered.manifest["spaces"]["visual"]["generation"] == recovered.generation()


def test_a_catalogs_store_kind_is_fixed_when_it_is_created(tmp_path: Path) -> None:
    build(tmp_path / "cat", None, count=5).close()
    with pytest.raises(CatalogError, match="keeps its vectors in faiss"):
        Catalog.open(tmp_path / "cat", store=MILVUS)
    with pytest.raises(CatalogError, match="collection prefix"):
        StoreConfig("milvus", collection_prefix="bad-name; drop")
    with pytest.raises(CatalogError, match="Unknown vector store"):
        StoreConfig("qdrant")


def test_filter_expressions_quote_what_users_type() -> None:
    expression = milvus_filter(
        Filters(max_nsfw_level=2, tags_required=(' A"b ',), tags_excluded=("x\\",)), {3, 1}
    )
    assert expression == (
        '(nsfw_level <= 2) and (array_contains(tags, "a\\"b")) and '
        '(not array_contains_any(tags, ["x\\\\"])) and (key not in [1, 3])'
    )
    assert milvus_filter(None) == ""
    with pytest.raises(ValueError):
        milvus_filter(Filters(min_alignment=float("nan")))


def test_add_without_attributes_is_refused(tmp_path: Path) -> None:
    with build(tmp_path / "cat", MILVUS, count=3) as catalog:
        store = catalog.indexes["visual"]
        with pytest.raises(ValueError, match="ItemAttributes"):
            store.add(np.array([9]), np.ones((1, 16), np.float32) / 4)


def test_the_engine_serves_the_same_scroll_from_either_store(tmp_path: Path) -> None:
    """The whole recommender over a Milvus catalog: same dump, same seed, same pages."""
    write_sample_dump(tmp_path / "dump", count=60, seed=3)
    pages: dict[str, list[list[str]]] = {}
    for name, store in (("faiss", None), ("milvus", MILVUS)):
        catalog = Catalog.create_or_open(tmp_path / name, specs(), store=store)
        index_dump(tmp_path / "dump", catalog, fake_encoders(), PipelineConfig(progress=False))
        engine = Engine(catalog, fake_encoders(), EngineConfig(), seed=0)
        start = min(item.id for item in catalog.iter_items())
        first = engine.search(ItemQuery(start), filters=Filters(max_nsfw_level=2))
        shown = [first]
        for _ in range(2):
            page = shown[-1]
            engine.feedback(
                page.session_id,
                [
                    FeedbackEvent(f"{name}-{page.items[0].id}-{i}", item.id, 500.0 + 300 * i)
                    for i, item in enumerate(page.items)
                ],
            )
            shown.append(engine.feed(first.session_id))
        pages[name] = [[item.id for item in page.items] for page in shown]
        catalog.close()
    assert pages["milvus"] == pages["faiss"]
    served = [i for page in pages["milvus"] for i in page]
    assert len(served) > 20 and len(served) == len(set(served))


@pytest.mark.usefixtures("restore_logging")
def test_the_cli_indexes_into_milvus_and_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_sample_dump(tmp_path / "dump", count=12, seed=1)
    catalog = str(tmp_path / "cat")
    args = ["index", str(tmp_path / "dump"), "--catalog", catalog, "--profile", "offline"]
    assert run_cli(monkeypatch, *args, "--vector-store", "milvus", "--no-progress") == 0
    capsys.readouterr()
    assert run_cli(monkeypatch, "info", "--catalog", catalog, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spaces"]["visual"]["index"] == "Milvus FLAT"
    assert info["spaces"]["visual"]["count"] == info["items"] > 0
    # An existing catalog keeps its store: a re-run needs no flag, another kind is refused.
    assert run_cli(monkeypatch, *args, "--no-progress") == 0
    assert capsys.readouterr().out.startswith("indexed 0,")
    assert run_cli(monkeypatch, *args, "--vector-store", "faiss", "--no-progress") == 2
    assert "keeps its vectors in milvus" in capsys.readouterr().err
    assert run_cli(monkeypatch, *args, "--vector-store", "qdrant") == 2
    assert "invalid setting: vector_store" in capsys.readouterr().err


def test_shards_merge_into_a_milvus_catalog(tmp_path: Path) -> None:
    """N machines index shards into FAISS parts; the merge fills one Milvus catalog."""
    write_sample_dump(tmp_path / "dump", count=40, seed=4)
    config = PipelineConfig(progress=False)
    parts = []
    for i in range(2):
        part = Catalog.create_or_open(tmp_path / f"part{i}", specs())
        index_dump(tmp_path / "dump", part, fake_encoders(), replace(config, shard=Shard(i, 2)))
        part.close()
        parts.append(tmp_path / f"part{i}")
    merge_catalogs(parts, tmp_path / "merged", progress=False, store=MILVUS)
    whole = Catalog.create_or_open(tmp_path / "whole", specs())
    index_dump(tmp_path / "dump", whole, fake_encoders(), config)
    with Catalog.open(tmp_path / "merged") as merged, whole:
        assert isinstance(merged.indexes["visual"], MilvusStore)
        assert len(merged.indexes["visual"]) == len(whole) == len(merged)
        some = next(whole.iter_items())
        query = whole.vectors("visual", [some.key])
        found = {}
        for name, catalog in (("merged", merged), ("whole", whole)):
            _, keys = catalog.search("visual", query, 10, filters=Filters(max_nsfw_level=3))
            found[name] = [item.id for item in catalog.items(keys[0][keys[0] >= 0].tolist())]
        assert found["merged"] == found["whole"]
