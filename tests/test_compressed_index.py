"""CompressedIndex: recall against exact search, filters, mutation, persistence, streaming build.

One index over 30k clustered 64-d vectors is built per module and saved; tests that change an
index load their own copy of that snapshot.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from indexer.compressed_index import MIN_TRAIN, CompressedIndex, exact_search
from indexer.vector_index import IndexPolicy

DIM = 64
N = 30_000
K = 100
POLICY = IndexPolicy(recall_target=0.95)
# Exact search only for filters admitting <= 100 keys, so looser ones take the IVF path.
IVF_FILTERS = IndexPolicy(recall_target=0.95, exact_limit=100)


def clustered(n: int, seed: int, centres_seed: int = 0) -> NDArray[np.float32]:
    """Unit vectors around 100 shared centres, with noise as large as the spread of centres."""
    centres = np.random.default_rng(centres_seed).normal(size=(100, DIM))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 100, n)] + 0.9 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Built:
    keys: NDArray[np.int64]
    vectors: NDArray[np.float32]
    queries: NDArray[np.float32]
    snapshot: Path
    index: CompressedIndex


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    vectors = clustered(N, seed=1)
    keys = np.arange(1, N + 1, dtype=np.int64) * 2  # catalog-like: 1-based, here with gaps
    index = CompressedIndex(DIM, POLICY)
    index.rebuild(keys, vectors)
    snapshot = tmp_path_factory.mktemp("compressed") / "visual.faiss"
    index.save(snapshot)
    return Built(keys, vectors, clustered(200, seed=2), snapshot, index)


@pytest.fixture
def copy(built: Built, tmp_path: Path) -> CompressedIndex:
    """A private copy of the built index, loaded from a copy of its snapshot."""
    for file in built.snapshot.parent.iterdir():
        shutil.copy(file, tmp_path / file.name)
    return CompressedIndex.load(tmp_path / built.snapshot.name, DIM, {}, POLICY)


def exact(
    built: Built,
    queries: NDArray[np.float32],
    k: int = K,
    allowed: NDArray[np.bool_] | None = None,
) -> NDArray[np.int64]:
    keep = None if allowed is None else (lambda keys: allowed[keys])
    return exact_search(built.vectors, built.keys, queries, k, keep=keep)[1]


def recall(found: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    return float(
        np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def test_recall_against_exact_meets_the_target(built: Built) -> None:
    _, found = built.index.search(built.queries, K)
    assert recall(found, exact(built, built.queries)) >= 0.95
    info = built.index.info
    assert info.kind.startswith("IVF") and info.kind.endswith("RefineMmap(float16)")
    assert info.nprobe is not None and info.refine_factor is not None
    assert info.measured_recall is not None and info.measured_recall >= 0.95
    assert info.to_json()["refine_factor"] == info.refine_factor
    assert info.count == len(built.index) == N


def test_scores_are_inner_products_with_the_stored_vectors(built: Built) -> None:
    scores, keys = built.index.search(built.queries[:5], 10)
    assert scores.dtype == np.float32 and keys.dtype == np.int64 and keys.shape == (5, 10)
    for query, row_scores, row_keys in zip(built.queries[:5], scores, keys, strict=True):
        stored = built.index.vectors(row_keys)
        np.testing.assert_allclose(stored @ query, row_scores, atol=1e-5)
        assert (np.diff(row_scores) <= 0).all()
    # float16 storage: each stored vector within 1e-3 of the original
    rows = np.searchsorted(built.keys, keys.ravel())
    np.testing.assert_allclose(built.index.vectors(keys.ravel()), built.vectors[rows], atol=1e-3)


@pytest.mark.parametrize("fraction", [0.5, 0.05, 0.002])
@pytest.mark.parametrize("policy", [POLICY, IVF_FILTERS], ids=["default", "ivf-filters"])
def test_filters_never_return_forbidden_keys_nor_come_back_short(
    built: Built, fraction: float, policy: IndexPolicy
) -> None:
    index = CompressedIndex.load(built.snapshot, DIM, {}, policy)
    rng = np.random.default_rng(3)
    allowed = np.zeros(2 * N + 10, dtype=bool)
    allowed[built.keys[rng.random(N) < fraction]] = True
    exclude = set(built.keys[rng.choice(N, 500, replace=False)].tolist())
    admitted = allowed.copy()
    admitted[list(exclude)] = False
    _, keys = index.search(built.queries[:20], K, allowed=allowed, exclude=exclude)
    assert admitted[keys[keys >= 0]].all()
    # Never short: every query gets k results while k keys are admitted.
    expected = min(K, int(admitted.sum()))
    assert ((keys >= 0).sum(axis=1) == expected).all()
    truth = exact(built, built.queries[:20], allowed=admitted)
    assert recall(keys, truth) >= (0.8 if fraction == 0.5 else 0.6)


def test_tight_filter_is_answered_exactly(built: Built) -> None:
    rng = np.random.default_rng(4)
    allowed = np.zeros(2 * N + 10, dtype=bool)
    allowed[built.keys[rng.random(N) < 0.1]] = True  # 3k keys <= exact_limit (20k)
    _, keys = built.index.search(built.queries[:20], K, allowed=allowed)
    assert recall(keys, exact(built, built.queries[:20], allowed=allowed)) >= 0.99


def test_exclude_alone(built: Built) -> None:
    _, before = built.index.search(built.queries[:10], K)
    banned = set(before[:, :10].ravel().tolist())
    _, after = built.index.search(built.queries[:10], K, exclude=banned)
    assert not banned & set(after.ravel().tolist())
    assert (after >= 0).all()


def test_a_mask_shorter_than_the_keys_allows_none_past_its_end(built: Built) -> None:
    allowed = np.ones(N, dtype=bool)  # keys run to 2N: the upper half is not allowed
    _, keys = built.index.search(built.queries[:10], K, allowed=allowed)
    assert ((keys >= 0) & (keys < N)).all()


def test_add_replace_and_remove(copy: CompressedIndex, built: Built) -> None:
    fresh = clustered(50, seed=5)
    new_keys = np.arange(10**6, 10**6 + 50, dtype=np.int64)
    copy.add(new_keys, fresh)
    assert len(copy) == N + 50
    _, keys = copy.search(fresh, 1)
    assert (keys[:, 0] == new_keys).all()

    moved = built.keys[:20]
    replacement = clustered(20, seed=6)
    copy.add(moved, replacement)
    assert len(copy) == N + 50
    np.testing.assert_allclose(copy.vectors(moved), replacement, atol=1e-3)
    scores, keys = copy.search(replacement, 1)
    assert (keys[:, 0] == moved).all()
    _, old = copy.search(built.vectors[:20], 1)
    assert not (old[:, 0] == moved).any()  # their old vectors no longer lead to them

    gone = np.concatenate([new_keys[:10], built.keys[100:110]])
    assert copy.remove(gone.tolist() + [7, 10**9]) == 20
    assert copy.remove([int(gone[0])]) == 0
    assert len(copy) == N + 30
    _, keys = copy.search(np.vstack([fresh[:10], built.vectors[100:110]]), K)
    assert not set(gone.tolist()) & set(keys.ravel().tolist())
    with pytest.raises(KeyError):
        copy.vectors(gone[:1])


def test_add_keeps_the_last_of_a_repeated_key(copy: CompressedIndex) -> None:
    fresh = clustered(2, seed=7)
    key = np.array([10**6, 10**6], dtype=np.int64)
    copy.add(key, fresh)
    assert len(copy) == N + 1
    np.testing.assert_allclose(copy.vectors(key[:1])[0], fresh[1], atol=1e-3)


@pytest.mark.parametrize("in_ram", [True, False])
def test_save_and_load_round_trip(built: Built, tmp_path: Path, in_ram: bool) -> None:
    """Vectors within ``ram_vectors_bytes`` are read into RAM; past it they are served from
    a mapping of the file. Either way the loaded index answers as the saved one did, and
    rows appended later are found."""
    from indexer.compressed_index import CompressionPolicy

    path = tmp_path / "catalog" / "visual.faiss"
    built.index.save(path)
    compression = CompressionPolicy(ram_vectors_bytes=2**30 if in_ram else 0)
    loaded = CompressedIndex.load(path, DIM, built.index.info.to_json(), POLICY, compression)
    assert loaded.info == built.index.info
    s1, k1 = built.index.search(built.queries, K)
    s2, k2 = loaded.search(built.queries, K)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(s1, s2)
    vectors_file = loaded.vectors_file
    assert vectors_file is not None and vectors_file.parent == path.parent
    assert (str(vectors_file) in Path("/proc/self/maps").read_text()) is not in_ram
    assert path.stat().st_size < vectors_file.stat().st_size / 2  # codes are far smaller
    extra = clustered(300, seed=7)
    loaded.add(np.arange(10**6, 10**6 + 300, dtype=np.int64), extra)
    np.testing.assert_allclose(loaded.vectors(np.array([10**6 + 299])), extra[-1:], atol=1e-3)
    assert loaded.search(extra[:5], 1)[1][:, 0].tolist() == list(range(10**6, 10**6 + 5))
    loaded.close()


def test_saving_after_changes_keeps_one_vectors_file_and_reloads(
    copy: CompressedIndex, tmp_path: Path
) -> None:
    path = tmp_path / "visual.faiss"
    fresh = clustered(30, seed=8)
    copy.add(np.arange(10**6, 10**6 + 30, dtype=np.int64), fresh)
    copy.remove([2, 4, 6])
    copy.save(path)
    copy.rebuild(np.arange(1, 2001, dtype=np.int64), clustered(2000, seed=9))
    copy.save(path)
    assert len(list(tmp_path.glob("visual.faiss.*.vectors"))) == 1
    assert not list(tmp_path.glob("*.work"))
    loaded = CompressedIndex.load(path, DIM, {}, POLICY)
    assert len(loaded) == 2000
    np.testing.assert_array_equal(loaded.search(fresh, 10)[1], copy.search(fresh, 10)[1])


def test_rows_a_crash_left_past_the_snapshot_are_ignored(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "visual.faiss"
    built.index.save(path)
    vectors_file = next(tmp_path.glob("visual.faiss.*.vectors"))
    with open(vectors_file, "ab") as f:
        f.write(b"\xff" * 1000)  # a killed writer's partial rows
    loaded = CompressedIndex.load(path, DIM, {}, POLICY)
    np.testing.assert_array_equal(
        loaded.search(built.queries[:10], K)[1], built.index.search(built.queries[:10], K)[1]
    )
    fresh = clustered(3, seed=10)
    loaded.add(np.array([10**6, 10**6 + 1, 10**6 + 2], dtype=np.int64), fresh)
    np.testing.assert_allclose(loaded.vectors(np.array([10**6 + 2])), fresh[2:], atol=1e-3)


def test_streaming_build_equals_the_in_memory_build(built: Built) -> None:
    streamed = CompressedIndex(DIM, POLICY)
    chunks = ((built.keys[a : a + 7_000], built.vectors[a : a + 7_000]) for a in range(0, N, 7_000))
    stats = streamed.build(chunks)
    assert stats.vectors == N
    assert streamed.info == built.index.info
    s1, k1 = built.index.search(built.queries, K)
    s2, k2 = streamed.search(built.queries, K)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(s1, s2)


def test_build_refuses_repeated_keys() -> None:
    index = CompressedIndex(DIM, POLICY)
    vectors = clustered(10, seed=11)
    with pytest.raises(ValueError, match="unique"):
        index.build([(np.arange(5), vectors[:5]), (np.arange(4, 9), vectors[5:])])
    assert len(index) == 0


def test_small_index_searches_exactly_until_rebuilt() -> None:
    index = CompressedIndex(DIM, POLICY)
    vectors = clustered(MIN_TRAIN + 200, seed=12)
    keys = np.arange(len(vectors), dtype=np.int64)
    index.add(keys[:500], vectors[:500])
    assert index.info.kind == "ExactMmap(float16)" and not index.needs_retype()
    queries = clustered(5, seed=13)
    truth = exact_search(vectors[:500], keys[:500], queries, 10)[1]
    assert recall(index.search(queries, 10)[1], truth) >= 0.99
    index.add(keys[500:], vectors[500:])
    assert index.needs_retype()
    index.rebuild(keys, vectors)
    assert index.info.kind.startswith("IVF") and not index.needs_retype()


def test_needs_retype_once_most_rows_are_dead(copy: CompressedIndex, built: Built) -> None:
    assert not copy.needs_retype()
    copy.add(built.keys, built.vectors)  # every row replaced: half the file is dead
    assert not copy.needs_retype()
    copy.add(built.keys[: N // 10], built.vectors[: N // 10])
    assert copy.needs_retype()
    assert len(copy) == N


def test_empty_index() -> None:
    index = CompressedIndex(DIM, POLICY)
    scores, keys = index.search(clustered(2, seed=14), 5)
    assert keys.shape == (2, 1) and (keys == -1).all()  # k is capped at len, as VectorIndex
    assert index.remove([1, 2]) == 0
    assert len(index) == 0


def test_a_dim_without_a_divisor_near_the_code_budget_is_padded(tmp_path: Path) -> None:
    """289 = 17 x 17 would get 17 codes (a tenth of recall lost); 290 gets 58. A padded index
    searches, survives a save and load, and removes keys like any other."""
    from indexer.compressed_index import CompressionPolicy, _pq_layout

    assert _pq_layout(289, 48) == (290, 58)
    assert _pq_layout(384, 48) == (384, 96)  # real encoders' dims need no padding
    assert _pq_layout(512, 48) == (512, 64)
    dim = 17
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4000, dim)) + 2.0 * rng.normal(size=(40, dim))[rng.integers(0, 40, 4000)]
    vectors = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    keys = np.arange(4000, dtype=np.int64)
    index = CompressedIndex(dim, IndexPolicy(recall_target=0.9), CompressionPolicy(code_bytes=8))
    index.rebuild(keys, vectors)
    assert index.info.kind.startswith("Pad18,")
    queries = vectors[:50]
    _, truth = exact_search(vectors, keys, queries, 50)
    _, found = index.search(queries, 50)
    hits = [len(np.intersect1d(f, t)) / 50 for f, t in zip(found, truth, strict=True)]
    assert np.mean(hits) >= 0.85
    index.save(tmp_path / "v.faiss")
    loaded = CompressedIndex.load(tmp_path / "v.faiss", dim, {}, IndexPolicy())
    assert np.array_equal(loaded.search(queries, 50)[1], found)
    assert loaded.remove([int(k) for k in found[0][:5]]) == 5
    assert not set(found[0][:5].tolist()) & set(loaded.search(queries[:1], 50)[1][0].tolist())
    loaded.close()
    index.close()


@pytest.mark.parametrize("dim", [17, 64, 289])
def test_float16_rows_are_scored_exactly_at_any_width(dim: int) -> None:
    """Few queries score float16 rows with FAISS's SIMD kernels, which take 8 dims at a time:
    other widths are zero-padded, and the scores stay the inner products of the rows."""
    rng = np.random.default_rng(dim)
    rows = rng.normal(size=(500, dim)).astype(np.float16)
    queries = rng.normal(size=(3, dim)).astype(np.float32)
    keys = np.arange(500, dtype=np.int64) + 7
    scores, found = exact_search(rows, keys, queries, 20)
    full = queries @ rows.astype(np.float32).T
    truth = np.argsort(-full, axis=1)[:, :20]
    np.testing.assert_array_equal(found, keys[truth])
    np.testing.assert_allclose(scores, np.take_along_axis(full, truth, 1), rtol=1e-5, atol=1e-4)
