"""One FAISS index per embedding space, keyed by the catalog's integer item keys.

Vectors are L2-normalised, so inner product is cosine similarity. Small spaces use an exact
flat index; past ``exact_limit`` vectors an IVF index is trained and its ``nprobe`` is tuned on
held-out queries until recall@k against exact search reaches the target (with 95 % confidence
for queries like them, not just on the sample).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import faiss
import numpy as np
from numpy.typing import NDArray

from indexer.filters import Filters, ItemAttributes
from indexer.storage import atomic_write

log = logging.getLogger(__name__)

Keys = NDArray[np.int64]

# One-sided 95 % normal quantile: how far below a sample's mean recall tuning looks.
RECALL_CONFIDENCE_Z = 1.645


@dataclass(frozen=True)
class IndexPolicy:
    """How the index type is chosen for a space's size."""

    exact_limit: int = 20_000
    recall_target: float = 0.95
    recall_k: int = 100
    tuning_queries: int = 200
    train_points_per_list: int = 40
    # Past this many vectors a space keeps compressed codes in RAM and float16 vectors for the
    # re-rank (CompressedIndex: in RAM up to 2 GiB, memory-mapped past it): half or less of
    # IVF-Flat's 4 x dim bytes per vector, a faster build, and at 1M vectors a search that
    # costs 0.5-2x IVF-Flat's at the same recall, depending on the data
    # (benchmarks/RESULTS.md, "Large catalogs" and "Service").
    compressed_limit: int = 500_000
    use_gpu: bool = False


@dataclass(frozen=True)
class IndexInfo:
    """What the manifest records about a space's index."""

    kind: str
    count: int
    nprobe: int | None = None
    measured_recall: float | None = None
    trained_on: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.kind,
            "count": self.count,
            "nprobe": self.nprobe,
            "measured_recall": self.measured_recall,
            "trained_on": self.trained_on,
        }


class VectorIndex:
    """A FAISS index over (key, vector) pairs with filtered search and atomic persistence.

    The catalog's default ``VectorStore``: filters reach it as a key mask (``allowed``), built
    from the catalog's in-memory columns, so it keeps no metadata of its own."""

    filters_itself: ClassVar[bool] = False

    def __init__(self, dim: int, policy: IndexPolicy | None = None) -> None:
        self.dim = dim
        self.policy = policy or IndexPolicy()
        self._index: faiss.Index = _flat(dim)
        self._kind = "Flat"
        self._nprobe: int | None = None
        self._recall: float | None = None
        self._trained_on: int | None = None
        self._lock = threading.RLock()

    # -- size and description -------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def info(self) -> IndexInfo:
        return IndexInfo(self._kind, len(self), self._nprobe, self._recall, self._trained_on)

    # -- mutation -------------------------------------------------------------------------
    def add(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> None:
        """Add or replace rows. ``vectors`` is float32 (n, dim), L2-normalised; ``attributes``
        are not kept (filters arrive as a mask)."""
        if len(keys) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        with self._lock:
            self._index.remove_ids(keys)
            self._index.add_with_ids(vectors, keys)

    def set_attributes(self, keys: Keys, attributes: Sequence[ItemAttributes]) -> None:
        """Nothing to do: this index keeps no metadata."""

    def remove(self, keys: Collection[int]) -> int:
        if not keys:
            return 0
        with self._lock:
            return int(self._index.remove_ids(np.fromiter(keys, dtype=np.int64)))

    def rebuild(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> None:
        """Replace the whole index with these rows, choosing the index type for their number."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        n = len(keys)
        if n <= self.policy.exact_limit:
            index, kind, nprobe, recall = _flat(self.dim), "Flat", None, None
            index.add_with_ids(vectors, keys)
        else:
            index, kind, nprobe, recall = self._build_ivf(keys, vectors)
        with self._lock:
            self._index, self._kind, self._nprobe, self._recall = index, kind, nprobe, recall
            self._trained_on = n if kind.startswith("IVF") else None

    def needs_retype(self) -> bool:
        """True when the space outgrew (or shrank below) the index type it has, or grew so far
        past what its IVF lists were trained on that they are too coarse to keep recall."""
        want_ivf = len(self) > self.policy.exact_limit
        if want_ivf != self._kind.startswith("IVF") or len(self) > self.policy.compressed_limit:
            return True
        return want_ivf and len(self) > 4 * (self._trained_on or 0)

    # -- reading --------------------------------------------------------------------------
    def search(
        self,
        queries: NDArray[np.float32],
        k: int,
        *,
        allowed: NDArray[np.bool_] | None = None,
        filters: Filters | None = None,
        exclude: Collection[int] = (),
    ) -> tuple[NDArray[np.float32], Keys]:
        """k-NN by cosine. ``queries`` float32 (q, dim). Returns scores (q, k) and keys (q, k).

        ``allowed`` is a boolean mask indexed by key (keys past its end are not allowed);
        ``filters`` are ignored (the mask says the same); ``exclude`` lists keys never to
        return. Missing results have key -1.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, max(len(self), 1)))
        selector, keep_alive = id_selector(allowed, exclude)
        single_thread_for_few(queries)
        nprobe = self._nprobe
        while True:
            with self._lock:
                scores, keys = self._index.search(queries, k, params=self._params(selector, nprobe))
            # A tight filter can empty the probed IVF lists: probe more before coming back short.
            if nprobe is None or selector is None or (keys >= 0).all() or nprobe >= self._nlist():
                break
            nprobe = min(nprobe * 4, self._nlist())
        del keep_alive
        return scores.astype(np.float32, copy=False), keys.astype(np.int64, copy=False)

    def vectors(self, keys: Keys) -> NDArray[np.float32]:
        """Stored vectors for ``keys`` (all must be present): float32 (n, dim)."""
        if len(keys) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            return np.asarray(
                self._index.reconstruct_batch(np.ascontiguousarray(keys, dtype=np.int64)),
                dtype=np.float32,
            )

    # -- persistence ----------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release: the index lives in this process's memory."""

    def save(self, path: Path) -> None:
        with self._lock:
            data = faiss.serialize_index(self._index)
        atomic_write(path, lambda tmp: tmp.write_bytes(data.tobytes()))

    @classmethod
    def load(
        cls, path: Path, dim: int, info: dict[str, object], policy: IndexPolicy
    ) -> VectorIndex:
        self = cls(dim, policy)
        index = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-d vectors, expected {dim}")
        if isinstance(index, faiss.IndexIVF):
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._index = index
        self._kind = str(info.get("index", "Flat"))
        self._nprobe = opt_int(info.get("nprobe"))
        self._recall = opt_float(info.get("measured_recall"))
        self._trained_on = opt_int(info.get("trained_on"))
        return self

    # -- internals ------------------------------------------------------------------------
    def _nlist(self) -> int:
        return int(getattr(self._index, "nlist", 1))

    def _params(
        self, selector: faiss.IDSelector | None, nprobe: int | None
    ) -> faiss.SearchParameters | None:
        if nprobe is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            if selector is not None:
                params.sel = selector
            return params
        if selector is None:
            return None
        return faiss.SearchParameters(sel=selector)

    def _build_ivf(
        self, keys: Keys, vectors: NDArray[np.float32]
    ) -> tuple[faiss.Index, str, int, float]:
        n = len(keys)
        nlist = max(16, int(4 * math.sqrt(n)))  # 4 sqrt(n): a third of the scan of sqrt(n)
        kind = f"IVF{nlist},Flat"
        rng = np.random.default_rng(0)
        train_n = min(n, nlist * self.policy.train_points_per_list)
        train = vectors[rng.choice(n, size=train_n, replace=False)]
        index = faiss.index_factory(self.dim, kind, faiss.METRIC_INNER_PRODUCT)
        log.info("training %s on %d of %d vectors", kind, train_n, n)
        built = _build_on_gpu(index, train, keys, vectors) if self.policy.use_gpu else None
        if built is None:
            index.train(train)
            index.add_with_ids(vectors, keys)
        else:
            index = built
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        nprobe, recall = _tune_nprobe(index, keys, vectors, self.policy, rng)
        log.info("%s: nprobe=%d gives recall@%d=%.3f", kind, nprobe, self.policy.recall_k, recall)
        return index, kind, nprobe, recall


def _build_on_gpu(
    index: faiss.Index, train: NDArray[np.float32], keys: Keys, vectors: NDArray[np.float32]
) -> faiss.Index | None:
    """``index`` (an untrained IVF) trained and filled on GPU 0, back on the CPU; None where
    that cannot be done. k-means and assigning every vector are the slow part of a build.

    Searches stay on the CPU: FAISS GPU indexes take no ID selector, which every filtered or
    seen-excluding search needs, and a feed page's search is a single query."""
    if faiss.get_num_gpus() == 0:
        log.info("use_gpu is set but FAISS sees no GPU; building on the CPU")
        return None
    try:
        resources = faiss.StandardGpuResources()
        on_gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        on_gpu.train(train)
        on_gpu.add_with_ids(vectors, keys)
        return faiss.index_gpu_to_cpu(on_gpu)
    except (RuntimeError, AttributeError) as exc:  # no GPU build of this type, or out of memory
        log.warning("could not build on the GPU (%s); building on the CPU", exc)
        return None


def single_thread_for_few(queries: NDArray[np.float32]) -> None:
    """Search a handful of queries on the calling thread alone: waking OpenMP workers costs
    more than they take. This sets only this thread's team size, so concurrent requests still
    use every core."""
    if len(queries) < 16:
        faiss.omp_set_num_threads(1)


def opt_int(value: object) -> int | None:
    """A number from a manifest or snapshot header as an int; None when it is not a number."""
    return int(value) if isinstance(value, int | float) else None


def opt_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def id_selector(
    allowed: NDArray[np.bool_] | None, exclude: Collection[int]
) -> tuple[faiss.IDSelector | None, list[object]]:
    """Build a FAISS selector; the second value keeps the arrays it points into alive.

    Both filters become a bitmap over keys: a scanned code costs one bit test, and building
    it costs ~0.1 ms. A hash set of the keys a session has seen (``IDSelectorBatch``) cost
    1 ms to build at 5,000 keys and slowed the scan, so a long scroll's searches grew slower
    page by page (1M items: 3.1 against 1.9 ms a search at 5,000 seen keys)."""
    banned = as_keys(exclude)
    if allowed is not None:
        bits = np.packbits(np.asarray(allowed, dtype=bool), bitorder="little")
        banned = banned[banned < len(allowed)]
        np.bitwise_and.at(bits, banned >> 3, ~_bit_of(banned))
        # FAISS bounds the bitmap by its length in bytes: a key past it is not a member.
        return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), [bits]
    if len(banned):
        bits = np.zeros((int(banned.max()) >> 3) + 1, dtype=np.uint8)
        np.bitwise_or.at(bits, banned >> 3, _bit_of(banned))
        members = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        return faiss.IDSelectorNot(members), [members, bits]
    return None, []


def as_keys(keys: Collection[int]) -> Keys:
    """``keys`` (a set, a list or an array) as an int64 array of the non-negative ones."""
    if isinstance(keys, np.ndarray):
        out = keys.astype(np.int64, copy=False).ravel()
    else:
        out = np.fromiter(keys, dtype=np.int64, count=len(keys))
    return out[out >= 0]


def _bit_of(keys: Keys) -> NDArray[np.uint8]:
    """Each key's bit within its byte of a little-endian bitmap."""
    return np.left_shift(1, keys & 7).astype(np.uint8)


def _tune_nprobe(
    index: faiss.Index,
    keys: Keys,
    vectors: NDArray[np.float32],
    policy: IndexPolicy,
    rng: np.random.Generator,
) -> tuple[int, float]:
    """Smallest nprobe (steps of about 1.5x) whose recall@k on sample queries meets the target
    (``meets_target``); returns it with the sample's mean recall.

    The sample queries are catalog vectors, but real queries are not in the index: each
    query's own key is left out of both its exact and its IVF results, since finding itself
    is free and would flatter the recall."""
    n = len(vectors)
    rows = rng.choice(n, size=min(policy.tuning_queries, n), replace=False)
    queries = vectors[rows]
    k = min(policy.recall_k, n - 1)
    exact = faiss.IndexFlatIP(index.d)
    exact.add(vectors)
    _, truth_rows = exact.search(queries, k + 1)
    truth = without_own(keys[truth_rows], keys[rows], k)
    recall = 0.0
    for nprobe in nprobe_steps(index.nlist):
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        _, found = index.search(queries, k + 1, params=params)
        recalls = query_recalls(without_own(found, keys[rows], k), truth)
        recall = float(recalls.mean())
        if meets_target(recalls, policy.recall_target):
            return nprobe, recall
    return int(index.nlist), recall


def without_own(found: Keys, own: Keys, k: int) -> Keys:
    """Each row's first ``k`` keys other than its query's own key (-1 pads a short row): a
    tuner's sample queries are stored vectors, which find themselves for free."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, (row, key) in enumerate(zip(found, own, strict=True)):
        others = row[row != key][:k]
        out[i, : len(others)] = others
    return out


def query_recalls(found: Keys, truth: Keys) -> NDArray[np.float64]:
    """Each row's share of its true keys found (-1: no key)."""
    return np.array(
        [
            len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth, strict=True)
        ],
        dtype=np.float64,
    )


def meets_target(recalls: NDArray[np.float64], target: float) -> bool:
    """Whether queries like these sampled ones reach ``target`` recall on average: the mean's
    lower bound at one-sided 95 % confidence does, not just the sample's mean. A mean of 200
    queries is off by ~0.002 (one standard error) near 0.95 at 1M vectors, so a setting tuned
    to the mean alone reaches the target on other queries about half of the time (0.951 held
    out at 1M, benchmarks/RESULTS.md, "Service")."""
    if not len(recalls):
        return True
    spread = float(recalls.std(ddof=1)) / math.sqrt(len(recalls)) if len(recalls) > 1 else 0.0
    return float(recalls.mean()) - RECALL_CONFIDENCE_Z * spread >= target


def nprobe_steps(nlist: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... up to ``nlist``: powers of two and the halfway points."""
    steps = sorted({s for p in range(32) for s in (1 << p, 3 << p >> 1) if 0 < s < nlist})
    return [*steps, nlist]
