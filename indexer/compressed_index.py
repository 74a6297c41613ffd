"""A FAISS index for large spaces: compressed codes in RAM, full vectors in a file.

Compressed codes stay in memory: an IVF index whose lists hold 4-bit product-quantizer codes
(FAISS fast-scan, residuals of the list centroid). The full vectors live in a file beside the
index snapshot, and the ``k * refine_factor`` best candidates of the compressed search are
re-ranked exactly from them: read into RAM while they fit ``ram_vectors_bytes`` (float16: half
of what an IVF-Flat index holds), memory-mapped past it. Mapped, RAM per vector is the PQ code,
its int64 id in its list and a 4-byte entry of the key -> row table; the vectors cost disk and
page cache only.

The vectors file is append-only: an added or replaced vector gets a new row, so a snapshot (which
records how many rows it covers) stays valid while the live index keeps appending to the same
file. ``nprobe`` and the refine factor are tuned on sample queries at build time until recall@k
against exact search reaches the policy's target.

Keys are the catalog's dense item keys: the key -> row table, like the ``allowed`` mask of
:meth:`CompressedIndex.search`, is indexed by key.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
from numpy.typing import NDArray

from indexer.arrays import grown
from indexer.filters import Filters, ItemAttributes
from indexer.storage import atomic_write, translate_disk_full
from indexer.vector_index import (
    IndexInfo,
    IndexPolicy,
    Keys,
    as_keys,
    id_selector,
    meets_target,
    nprobe_steps,
    opt_float,
    opt_int,
    query_recalls,
    single_thread_for_few,
    without_own,
)

log = logging.getLogger(__name__)

Chunk = tuple[Keys, NDArray[np.float32]]
KeepKeys = Callable[[Keys], NDArray[np.bool_]]

MAGIC = b"LKCMPIX1"
FORMAT = 1
# Fewer vectors than this are searched exactly: too few to train lists and 4-bit codebooks.
MIN_TRAIN = 1024
# What FAISS reports for an empty result slot under inner product.
MISSING_SCORE = np.float32(-np.finfo(np.float32).max)
# Single-query cost model that picks (nprobe, refine factor): fast-scan cost per code scanned
# and exact re-rank cost per candidate from a page-cached float16 file, measured on the dev box
# (benchmarks/RESULTS.md, "Large catalogs").
SCAN_S_PER_CODE = 25e-9
RERANK_S_PER_ROW = 0.5e-6
_ADD_ROWS = 65_536
_SCAN_ROWS = 131_072


@dataclass(frozen=True)
class CompressionPolicy:
    """How the compressed index is shaped; ``IndexPolicy`` still sets the recall target."""

    # PQ code bytes per vector in RAM (two 4-bit sub-quantizers per byte, each over >= 2 dims).
    code_bytes: int = 48
    # Candidates re-ranked exactly, as multiples of k; tuning picks the cheapest that reaches
    # the recall target.
    refine_factors: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    # float16 halves the file and the page cache it needs; the re-rank error is ~1e-4 cosine.
    vector_dtype: str = "float16"
    # Vectors up to this size are read into RAM (768 MB at 1M x 384 float16); past it they are
    # memory-mapped. A file's pages can be evicted when idle (and are, within a minute, on VMs
    # that reclaim cold memory), after which each query reads ~1,000 scattered rows from disk:
    # 13 ms instead of 1.5 ms at 1M vectors (benchmarks/RESULTS.md, "Large catalogs").
    ram_vectors_bytes: int = 2 * 2**30


@dataclass(frozen=True)
class CompressedIndexInfo(IndexInfo):
    """``IndexInfo`` plus the tuned refine factor."""

    refine_factor: int | None = None

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "refine_factor": self.refine_factor}


@dataclass(frozen=True)
class BuildStats:
    """Seconds spent in each stage of a build."""

    vectors: int
    write_s: float
    train_s: float
    add_s: float
    tune_s: float


@dataclass(frozen=True)
class _Tuning:
    nprobe: int
    refine_factor: int
    recall: float
    cost_s: float


class CompressedIndex:
    """IVF + PQ codes in RAM, full vectors memory-mapped from disk, exact re-rank.

    Same interface as :class:`indexer.vector_index.VectorIndex`, plus :meth:`build`, which
    streams (keys, vectors) chunks so the vectors never need to be in RAM at once.
    ``workdir`` is where a build writes its vectors file until :meth:`save` moves it beside
    the snapshot (default: a private temporary directory, removed with the index).
    """

    filters_itself: ClassVar[bool] = False  # filters arrive as a key mask, as for VectorIndex

    def __init__(
        self,
        dim: int,
        policy: IndexPolicy | None = None,
        compression: CompressionPolicy | None = None,
        *,
        workdir: Path | None = None,
    ) -> None:
        self.dim = dim
        self.policy = policy or IndexPolicy()
        self.compression = compression or CompressionPolicy()
        self._dtype = np.dtype(self.compression.vector_dtype)
        if self._dtype not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise ValueError(f"vector_dtype must be float16 or float32, not {self._dtype}")
        self._workdir = workdir
        self._private_dir: Path | None = None
        self._lock = threading.RLock()
        self._ivf: faiss.Index | None = None  # an IndexIVF, or one behind a Pad transform
        self._kind = f"ExactMmap({self._dtype.name})"
        self._nprobe: int | None = None
        self._refine: int | None = None
        self._recall: float | None = None
        self._trained_on: int | None = None
        self._table = np.full(0, -1, dtype=np.int32)  # key -> row of the vectors file, -1: absent
        self._count = 0
        self._file: Path | None = None
        self._n_rows = 0
        self._mm: NDArray[Any] = _map(None, 0, dim, self._dtype)

    # -- size and description -------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def info(self) -> CompressedIndexInfo:
        return CompressedIndexInfo(
            self._kind,
            self._count,
            self._nprobe,
            self._recall,
            self._trained_on,
            self._refine,
        )

    @property
    def vectors_file(self) -> Path | None:
        """The memory-mapped file holding the full vectors (None before anything was added)."""
        return self._file

    # -- mutation -------------------------------------------------------------------------
    def add(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> None:
        """Add or replace rows. ``vectors`` is float32 (n, dim), L2-normalised; ``attributes``
        are not kept (filters arrive as a mask)."""
        keys, vectors = self._checked(keys, vectors)
        if len(keys) == 0:
            return
        # The last occurrence of a key repeated within the batch wins.
        _, last = np.unique(keys[::-1], return_index=True)
        if len(last) != len(keys):
            keep = np.sort(len(keys) - 1 - last)
            keys, vectors = keys[keep], vectors[keep]
        with self._lock:
            replaced = self._present(keys)
            if self._ivf is not None and len(replaced):
                self._ivf.remove_ids(faiss.IDSelectorBatch(replaced))
            first = self._append(vectors)
            self._table = grown(self._table, int(keys.max()) + 1, fill=-1, spare=0.25)
            self._table[keys] = np.arange(first, first + len(keys), dtype=np.int32)
            self._count += len(keys) - len(replaced)
            if self._ivf is not None:
                self._ivf.add_with_ids(vectors, keys)

    def set_attributes(self, keys: Keys, attributes: Sequence[ItemAttributes]) -> None:
        """Nothing to do: this index keeps no metadata."""

    def remove(self, keys: Collection[int]) -> int:
        if not keys:
            return 0
        with self._lock:
            present = self._present(np.fromiter(keys, dtype=np.int64))
            if len(present) == 0:
                return 0
            if self._ivf is not None:
                self._ivf.remove_ids(faiss.IDSelectorBatch(present))
            self._table[present] = -1
            self._count -= len(present)
            return len(present)

    def rebuild(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> BuildStats:
        """Replace the whole index with these rows (see :meth:`build`)."""
        return self.build([(keys, vectors)])

    def build(self, chunks: Iterable[Chunk]) -> BuildStats:
        """Replace the whole index with the rows of ``chunks``, read once, in order.

        Each chunk is (keys int64 (n,), vectors float32 (n, dim), L2-normalised); keys must be
        unique across chunks. The vectors go to a new file first; the lists and codebooks are
        trained on a sample read back from it, and the codes are added from it chunk by chunk.
        """
        started = time.perf_counter()
        file = self._new_file()
        try:
            keys = self._write_chunks(file, chunks)
            n = len(keys)
            if len(np.unique(keys)) != n:
                raise ValueError("build: keys must be unique")
            table = np.full(int(keys.max()) + 1 if n else 0, -1, dtype=np.int32)
            table[keys] = np.arange(n, dtype=np.int32)
            mm = self._vector_rows(file, n)
            written = time.perf_counter()
            ivf: faiss.Index | None = None
            kind, tuning = f"ExactMmap({self._dtype.name})", None
            if n >= MIN_TRAIN:
                ivf, kind = self._train(mm)
            trained = time.perf_counter()
            if ivf is not None:
                for a in range(0, n, _ADD_ROWS):
                    block = np.asarray(mm[a : a + _ADD_ROWS], dtype=np.float32)
                    ivf.add_with_ids(block, keys[a : a + _ADD_ROWS])
            added = time.perf_counter()
            if ivf is not None:
                tuning = self._tune(ivf, mm, table, keys)
                kind = f"{kind},RefineMmap({self._dtype.name})"
            tuned = time.perf_counter()
        except BaseException:
            file.unlink(missing_ok=True)
            raise
        with self._lock:
            old = self._file
            self._ivf, self._kind, self._table, self._count = ivf, kind, table, n
            self._file, self._n_rows, self._mm = file, n, mm
            self._nprobe = tuning.nprobe if tuning else None
            self._refine = tuning.refine_factor if tuning else None
            self._recall = tuning.recall if tuning else None
            self._trained_on = n if ivf is not None else None
        if old is not None and old.suffix == ".work":
            old.unlink(missing_ok=True)  # never saved: nothing else refers to it
        stats = BuildStats(n, written - started, trained - written, added - trained, tuned - added)
        log.info(
            "built %s over %d vectors in %.0f s (write %.0f, train %.0f, add %.0f, tune %.0f)",
            kind,
            n,
            tuned - started,
            stats.write_s,
            stats.train_s,
            stats.add_s,
            stats.tune_s,
        )
        return stats

    def needs_retype(self) -> bool:
        """True when a rebuild is due: the index is still untrained (exact) but large enough
        to train, grew past 4x what its lists were trained on, or most of its vectors file is
        rows that were replaced or removed."""
        if self._ivf is None:
            return self._count >= MIN_TRAIN
        if self._count > 4 * (self._trained_on or 0):
            return True
        return self._n_rows - self._count > max(self._count, MIN_TRAIN)

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
        return. Missing results have key -1. Scores are exact
        inner products with the stored vectors.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        single_thread_for_few(queries)
        with self._lock:
            k = max(1, min(k, max(self._count, 1)))
            if self._ivf is None or self._nprobe is None or self._refine is None:
                keep = _keep_keys(allowed, exclude)
                return exact_search(self._mm, self._row_keys(), queries, k, keep=keep)
            admitted = self._count if allowed is None else int(np.count_nonzero(allowed))
            if allowed is not None and admitted <= self.policy.exact_limit:
                # A filter this tight leaves too few keys in the probed lists to rank them
                # well, and scoring those keys exactly costs less than probing.
                return self._search_among(queries, k, allowed, exclude)
            candidates = self._candidates(queries, k, allowed, exclude, admitted)
            return _rerank(self._mm, self._table, queries, candidates, k)

    def vectors(self, keys: Keys) -> NDArray[np.float32]:
        """Stored vectors for ``keys`` (all must be present): float32 (n, dim)."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        with self._lock:
            rows = _rows_of(self._table, keys)
            if (rows < 0).any():
                raise KeyError(f"keys not in the index: {keys[rows < 0][:10].tolist()}")
            return np.asarray(self._mm[rows], dtype=np.float32)

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the snapshot to ``path`` atomically, with the vectors file beside it.

        The vectors file is fsynced before the snapshot that refers to it is renamed into
        place; older vectors files of the same snapshot name are deleted after.
        """
        with self._lock:
            vectors = self._place_vectors(path)
            with translate_disk_full(f"writing {vectors}"), open(vectors, "rb+") as f:
                os.fsync(f.fileno())
            header = {
                "format": FORMAT,
                "dim": self.dim,
                "dtype": self._dtype.name,
                "vectors": vectors.name,
                "rows": self._n_rows,
                "count": self._count,
                "kind": self._kind,
                "nprobe": self._nprobe,
                "refine_factor": self._refine,
                "measured_recall": self._recall,
                "trained_on": self._trained_on,
            }
            index = (
                faiss.serialize_index(self._ivf)
                if self._ivf is not None
                else np.zeros(0, dtype=np.uint8)
            )
            table = self._table.copy()
        header["index_bytes"] = int(index.nbytes)
        header["table_len"] = len(table)
        head = json.dumps(header, sort_keys=True).encode()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(head).to_bytes(8, "little") + head)
                index.tofile(f)
                table.tofile(f)

        atomic_write(path, write)
        for old in path.parent.glob(f"{path.name}.*.vectors"):
            if old != vectors:
                old.unlink(missing_ok=True)

    @classmethod
    def load(
        cls,
        path: Path,
        dim: int,
        info: dict[str, object],
        policy: IndexPolicy,
        compression: CompressionPolicy | None = None,
        *,
        workdir: Path | None = None,
    ) -> CompressedIndex:
        """Open a snapshot; its vectors are read into RAM, or memory-mapped past
        ``ram_vectors_bytes``.

        The snapshot describes itself (``info``, the manifest's copy, is accepted for the same
        signature as ``VectorIndex.load``). Later rebuilds write to ``workdir``, by default the
        snapshot's directory, so that saving moves the new file by a rename.
        """
        del info
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{path} is not a compressed index snapshot")
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            raw = np.fromfile(f, dtype=np.uint8, count=int(header["index_bytes"]))
            table = np.fromfile(f, dtype=np.int32, count=int(header["table_len"]))
        if header.get("format") != FORMAT or int(header["dim"]) != dim:
            raise ValueError(f"{path} holds format {header.get('format')}, dim {header['dim']}")
        if len(raw) != int(header["index_bytes"]) or len(table) != int(header["table_len"]):
            raise ValueError(f"{path} is truncated")
        compression = compression or CompressionPolicy()
        if compression.vector_dtype != header["dtype"]:
            compression = replace(compression, vector_dtype=str(header["dtype"]))
        self = cls(dim, policy, compression, workdir=workdir or path.parent)
        file = path.parent / str(header["vectors"])
        rows = int(header["rows"])
        if file.stat().st_size < rows * dim * self._dtype.itemsize:
            raise ValueError(f"{file} holds fewer than the snapshot's {rows} rows")
        self._ivf = faiss.deserialize_index(raw) if len(raw) else None
        del raw
        self._table, self._count = table, int(header["count"])
        self._file, self._n_rows, self._mm = file, rows, self._vector_rows(file, rows)
        self._kind = str(header["kind"])
        self._nprobe = opt_int(header.get("nprobe"))
        self._refine = opt_int(header.get("refine_factor"))
        self._recall = opt_float(header.get("measured_recall"))
        self._trained_on = opt_int(header.get("trained_on"))
        return self

    def close(self) -> None:
        """Unmap the vectors and delete an unsaved vectors file this index wrote."""
        with self._lock:
            self._mm = _map(None, 0, self.dim, self._dtype)
            if self._file is not None and self._file.suffix == ".work":
                self._file.unlink(missing_ok=True)
            self._file, self._n_rows, self._ivf, self._count = None, 0, None, 0
            self._table = np.full(0, -1, dtype=np.int32)

    # -- internals: search ----------------------------------------------------------------
    def _candidates(
        self,
        queries: NDArray[np.float32],
        k: int,
        allowed: NDArray[np.bool_] | None,
        exclude: Collection[int],
        admitted: int,
    ) -> Keys:
        """The compressed search's best keys per query to score exactly (-1: none)."""
        assert self._ivf is not None and self._nprobe is not None and self._refine is not None
        selector, keep_alive = id_selector(allowed, exclude)
        # The refine factor was tuned at recall_k: a smaller k re-ranks as many candidates, since
        # fewer would rank its first results on the codes' error alone. A larger k (a page of
        # more than 50, a clip-retrieval client's num_images) adds only its extra results: its
        # first recall_k keep the tuned recall, and scoring ``k * refine`` rows costs about
        # 0.6 us a row (random reads of the float16 vectors). At 1M, k = 200: 2.9 against 4.3 ms
        # a search, recall@200 0.91 against 0.93.
        recall_k = self.policy.recall_k
        wanted = min(recall_k * self._refine + max(0, k - recall_k), self._count)
        nlist = int(faiss.extract_index_ivf(self._ivf).nlist)
        # The k best allowed keys lie as far out as the k / f best of all (f: the fraction
        # allowed); probing up to 4x more lists recovers part of that (measured at 1M, 10 %
        # allowed: recall@100 0.78 -> 0.85; beyond 4x it gains little for the time).
        widen = min(4.0, math.sqrt(self._count / max(admitted, 1)))
        nprobe = min(nlist, math.ceil(self._nprobe * widen))
        while True:
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            if selector is not None:
                params.sel = selector
            _, candidates = self._ivf.search(queries, wanted, params=params)
            # A tight filter (or sparse lists) can leave the probed lists short: probe more.
            if nprobe >= nlist or ((candidates >= 0).sum(axis=1) >= k).all():
                break
            nprobe = min(nprobe * 4, nlist)
        del keep_alive
        return np.asarray(candidates, dtype=np.int64)

    def _search_among(
        self,
        queries: NDArray[np.float32],
        k: int,
        allowed: NDArray[np.bool_] | None,
        exclude: Collection[int],
    ) -> tuple[NDArray[np.float32], Keys]:
        """Exact search over the keys ``allowed`` admits (few), minus ``exclude``."""
        assert allowed is not None
        keys = np.flatnonzero(allowed).astype(np.int64)
        if len(exclude):
            keys = keys[~np.isin(keys, as_keys(exclude))]
        rows = _rows_of(self._table, keys)
        keys, rows = keys[rows >= 0], rows[rows >= 0]
        scores = np.full((len(queries), k), MISSING_SCORE, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        if len(keys):
            order = np.argsort(rows)  # read the file in order
            keys, rows = keys[order], rows[order]
            s, pos = _knn(queries, np.take(self._mm, rows, axis=0), min(k, len(keys)))
            scores[:, : s.shape[1]] = s
            found[:, : s.shape[1]] = np.where(pos >= 0, keys[np.maximum(pos, 0)], -1)
        return scores, found

    def _row_keys(self) -> Keys:
        """row -> key over the vectors file (-1 for rows since replaced or removed)."""
        row_keys = np.full(self._n_rows, -1, dtype=np.int64)
        live = np.flatnonzero(self._table >= 0)
        row_keys[self._table[live]] = live
        return row_keys

    # -- internals: building --------------------------------------------------------------
    def _train(self, mm: NDArray[Any]) -> tuple[faiss.Index, str]:
        n = len(mm)
        nlist = _nlist_for(n)
        padded, m = _pq_layout(self.dim, self.compression.code_bytes)
        # L2 lists and residual codes: the same neighbours as inner product for unit vectors,
        # and at 1M vectors recall@100 0.94 against 0.86 for the inner-product fast-scan index
        # at the same nprobe and refine factor (residual codes are not used under IP).
        kind = f"IVF{nlist},PQ{m}x4fsr"
        if padded != self.dim:  # zero dims that give the codes a divisor near their budget
            kind = f"Pad{padded},{kind}"
        ivf = faiss.index_factory(self.dim, kind, faiss.METRIC_L2)
        rng = np.random.default_rng(0)
        train_n = min(n, max(nlist * self.policy.train_points_per_list, 16 * 64))
        rows = np.sort(rng.choice(n, size=train_n, replace=False))
        log.info("training %s on %d of %d vectors", kind, train_n, n)
        ivf.train(np.asarray(mm[rows], dtype=np.float32))
        return ivf, kind

    def _tune(
        self, ivf: faiss.Index, mm: NDArray[Any], table: NDArray[np.int32], keys: Keys
    ) -> _Tuning:
        """Cheapest (nprobe, refine factor) whose recall@k on sample queries meets the target
        (``meets_target``), with the sample's mean recall.

        nprobe grows from 1 in steps of about 1.5x; each step re-ranks the largest candidate
        list once and scores every refine factor on its prefixes. Stops once scanning alone
        costs more than the best setting found. The sample queries are stored vectors, but
        real queries are not in the index: each query's own key is left out of its exact and
        its approximate results, since finding itself is free and would flatter the recall.
        """
        n = len(keys)
        rng = np.random.default_rng(1)
        rows = np.sort(rng.choice(n, size=min(self.policy.tuning_queries, n), replace=False))
        queries = np.asarray(mm[rows], dtype=np.float32)
        own = keys[rows]
        k = min(self.policy.recall_k, n - 1)
        _, with_self = exact_search(mm, keys, queries, k + 1)
        truth = without_own(with_self, own, k)
        factors = sorted(set(self.compression.refine_factors))
        # Queries fall where the data is: the lists they probe are longer than the mean.
        inner = faiss.extract_index_ivf(ivf)  # behind the Pad transform, if any
        nlist, lists = int(inner.nlist), inner.invlists
        assert lists is not None
        sizes = np.array([lists.list_size(i) for i in range(nlist)], dtype=np.float64)
        codes_per_list = float((sizes**2).sum() / max(1, n))
        best: _Tuning | None = None
        fallback = _Tuning(nlist, factors[-1], 0.0, math.inf)
        for nprobe in nprobe_steps(nlist):
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe
            _, candidates = ivf.search(queries, min(k * factors[-1] + 1, n), params=params)
            scan_s = nprobe * codes_per_list * SCAN_S_PER_CODE
            for factor in factors:
                width = min(k * factor + 1, n)
                _, found = _rerank(mm, table, queries, candidates[:, :width], k + 1)
                recalls = query_recalls(without_own(found, own, k), truth)
                recall = float(recalls.mean())
                option = _Tuning(nprobe, factor, recall, scan_s + k * factor * RERANK_S_PER_ROW)
                log.debug("nprobe %d refine %d: recall@%d %.3f", nprobe, factor, k, recall)
                if meets_target(recalls, self.policy.recall_target) and (
                    best is None or option.cost_s < best.cost_s
                ):
                    best = option
                if recall > fallback.recall:
                    fallback = option
            # More probes cannot be cheaper once the smallest factor passes or scanning alone
            # costs more than the best setting found.
            if best is not None and (best.refine_factor == factors[0] or scan_s >= best.cost_s):
                break
        if best is None:
            log.warning(
                "recall target %.2f not reached; best recall@%d %.3f",
                self.policy.recall_target,
                k,
                fallback.recall,
            )
            best = fallback
        log.info(
            "tuned: nprobe=%d refine_factor=%d gives recall@%d=%.3f on %d queries",
            best.nprobe,
            best.refine_factor,
            k,
            best.recall,
            len(queries),
        )
        return best

    # -- internals: storage ---------------------------------------------------------------
    def _checked(
        self, keys: Keys, vectors: NDArray[np.float32]
    ) -> tuple[Keys, NDArray[np.float32]]:
        keys = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(
                f"expected vectors of shape ({len(keys)}, {self.dim}), got {vectors.shape}"
            )
        if len(keys) and keys.min() < 0:
            raise ValueError("keys must be >= 0")
        return keys, vectors

    def _present(self, keys: Keys) -> Keys:
        return np.unique(keys[_rows_of(self._table, keys) >= 0])

    def _new_file(self) -> Path:
        directory = self._workdir
        if directory is None:
            if self._private_dir is None:
                self._private_dir = Path(tempfile.mkdtemp(prefix="lookalike-vectors-"))
                weakref.finalize(self, shutil.rmtree, self._private_dir, ignore_errors=True)
            directory = self._private_dir
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{uuid.uuid4().hex[:16]}.vectors.work"

    def _write_chunks(self, file: Path, chunks: Iterable[Chunk]) -> Keys:
        parts: list[Keys] = []
        with translate_disk_full(f"writing {file}"), open(file, "wb") as out:
            for keys, vectors in chunks:
                keys, vectors = self._checked(keys, vectors)
                vectors.astype(self._dtype, copy=False).tofile(out)
                parts.append(keys)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _append(self, vectors: NDArray[np.float32]) -> int:
        """Append rows to the vectors file; returns the first new row."""
        if self._file is None:
            self._file = self._new_file()
            self._file.touch()
        first = self._n_rows
        # Write where this index's rows end: a crashed writer may have left rows past them.
        with translate_disk_full(f"writing {self._file}"), open(self._file, "rb+") as f:
            f.seek(first * self.dim * self._dtype.itemsize)
            vectors.astype(self._dtype, copy=False).tofile(f)
            f.truncate()
        self._n_rows += len(vectors)
        self._mm = self._vector_rows(self._file, self._n_rows, held=self._mm)
        return first

    def _vector_rows(
        self, file: Path | None, rows: int, held: NDArray[Any] | None = None
    ) -> NDArray[Any]:
        """The first ``rows`` rows of ``file``: in RAM up to ``ram_vectors_bytes``, else
        memory-mapped. ``held``: the rows of this same file already in RAM (a prefix, since
        the file is append-only), which are not read again."""
        if file is None or rows == 0:
            return np.zeros((0, self.dim), dtype=self._dtype)
        if rows * self.dim * self._dtype.itemsize > self.compression.ram_vectors_bytes:
            return _map(file, rows, self.dim, self._dtype)
        # A RAM copy is a view of a buffer it owns (a mapped file's array owns no data).
        buffer = held.base if held is not None and isinstance(held.base, np.ndarray) else None
        if buffer is not None and not buffer.flags.owndata:
            buffer = None
        have = len(held) if buffer is not None and held is not None else 0
        if buffer is None or len(buffer) < rows:  # grow by a quarter: appends come in batches
            bigger = np.empty((max(rows, have + have // 4), self.dim), dtype=self._dtype)
            if buffer is not None:
                bigger[:have] = buffer[:have]
            buffer = bigger
        if rows > have:
            _read_rows(file, have, buffer[have:rows])
        return buffer[:rows]

    def _place_vectors(self, path: Path) -> Path:
        """The vectors file beside ``path``: moved there if unsaved, copied if another
        snapshot's, kept if already this snapshot name's."""
        if self._file is None:
            self._file = self._new_file()
            self._file.touch()
        if self._file.parent == path.parent and self._file.name.startswith(f"{path.name}."):
            return self._file
        target = path.parent / f"{path.name}.{uuid.uuid4().hex[:16]}.vectors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with translate_disk_full(f"writing {target}"):
            if self._file.suffix == ".work":
                try:
                    os.replace(self._file, target)
                except OSError:  # another filesystem
                    shutil.copyfile(self._file, target)
                    self._file.unlink()
            else:
                shutil.copyfile(self._file, target)
        self._file = target
        self._mm = self._vector_rows(target, self._n_rows, held=self._mm)
        return target


# -- exact search over a vectors file ---------------------------------------------------------


def exact_search(
    vectors: NDArray[Any],
    row_keys: Keys,
    queries: NDArray[np.float32],
    k: int,
    *,
    keep: KeepKeys | None = None,
) -> tuple[NDArray[np.float32], Keys]:
    """Brute-force k-NN by inner product, reading ``vectors`` (n, dim) in row blocks.

    ``vectors`` is float16 or float32, typically a ``np.memmap``; ``row_keys`` (n,) gives each
    row's key (-1: skip the row); ``keep`` says which keys may be returned. Returns scores
    float32 (q, k) and keys int64 (q, k), -1 where fewer than k rows qualify.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    scores = np.full((len(queries), k), MISSING_SCORE, dtype=np.float32)
    keys = np.full((len(queries), k), -1, dtype=np.int64)
    for a in range(0, len(vectors), _SCAN_ROWS):
        block_keys = row_keys[a : a + _SCAN_ROWS]
        block = vectors[a : a + _SCAN_ROWS]
        usable = block_keys >= 0
        if keep is not None:
            usable &= keep(block_keys)
        if not usable.all():
            block, block_keys = block[usable], block_keys[usable]
        if len(block_keys) == 0:
            continue
        s, i = _knn(queries, block, min(k, len(block_keys)))
        found = np.where(i >= 0, block_keys[np.maximum(i, 0)], -1)
        scores, keys = _top_k(np.hstack([scores, s]), np.hstack([keys, found]), k)
    return scores, keys


def _knn(
    queries: NDArray[np.float32], block: NDArray[Any], k: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Top-k inner products of ``queries`` over the rows of ``block``: scores and positions."""
    if len(queries) < 8:
        if block.dtype == np.float16:
            # FAISS scores float16 rows directly (SIMD); numpy's float16 -> float32 cast takes
            # ~3 ns per element here, 5x longer than FAISS's whole search.
            queries, block = _simd_width(queries, block)
            flat = faiss.IndexScalarQuantizer(
                block.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
            )
            flat.add_sa_codes(np.ascontiguousarray(block).view(np.uint8))
            return flat.search(queries, k)
        rows = np.ascontiguousarray(block, dtype=np.float32)
        return faiss.knn(queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)
    # Many queries: one BLAS product; FAISS's knn takes 3x longer for 200 queries x 131k rows.
    scores = queries @ np.asarray(block, dtype=np.float32).T
    if k < scores.shape[1]:
        positions = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        positions = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    best = np.take_along_axis(scores, positions, 1)
    order = np.argsort(-best, axis=1, kind="stable")
    return np.take_along_axis(best, order, 1), np.take_along_axis(positions, order, 1)


def _simd_width(
    queries: NDArray[np.float32], block: NDArray[np.float16]
) -> tuple[NDArray[np.float32], NDArray[np.float16]]:
    """``queries`` and ``block`` zero-padded to a multiple of 8 dims (same inner products).

    FAISS's SIMD float16 kernels take 8 dims at a time; other widths (the offline profile's
    289-dim pixels space) fall back to scalar code, 3-4x slower: 800 rows, 289 dims: 0.65 ms,
    against 0.17 ms padded to 296, the copy included."""
    dim = block.shape[1]
    if dim % 8 == 0:
        return queries, block
    width = dim + 8 - dim % 8
    padded_block = np.zeros((len(block), width), dtype=block.dtype)
    padded_block[:, :dim] = block
    padded_queries = np.zeros((len(queries), width), dtype=queries.dtype)
    padded_queries[:, :dim] = queries
    return padded_queries, padded_block


def _rerank(
    mm: NDArray[Any],
    table: NDArray[np.int32],
    queries: NDArray[np.float32],
    candidates: Keys,
    k: int,
) -> tuple[NDArray[np.float32], Keys]:
    """Exact top-k of each query among its candidate keys (-1: none), from the stored vectors."""
    scores = np.full((len(queries), k), MISSING_SCORE, dtype=np.float32)
    keys = np.full((len(queries), k), -1, dtype=np.int64)
    for i, query in enumerate(queries):
        rows = _rows_of(table, candidates[i])
        valid = rows >= 0
        if not valid.any():
            continue
        found = candidates[i][valid]
        s, pos = _knn(query[None, :], np.take(mm, rows[valid], axis=0), min(k, len(found)))
        scores[i, : s.shape[1]] = s[0]
        keys[i, : s.shape[1]] = np.where(pos[0] >= 0, found[np.maximum(pos[0], 0)], -1)
    return scores, keys


def _top_k(scores: NDArray[np.float32], keys: Keys, k: int) -> tuple[NDArray[np.float32], Keys]:
    """The k best (score, key) pairs per row, best first; -1 keys sort last."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, keys = np.take_along_axis(scores, part, 1), np.take_along_axis(keys, part, 1)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores, keys = np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=MISSING_SCORE)
        keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-1)
    keys = np.where(scores > MISSING_SCORE, keys, -1)
    return scores.astype(np.float32, copy=False), keys.astype(np.int64, copy=False)


# -- helpers -------------------------------------------------------------------------------------


def _read_rows(file: Path, first: int, out: NDArray[Any]) -> None:
    """Fill ``out`` (rows, dim) with the file's rows from row ``first`` on."""
    view = out.reshape(-1).view(np.uint8).data
    with open(file, "rb", buffering=0) as f:
        f.seek(first * out.shape[1] * out.itemsize)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise ValueError(f"{file} ends before row {first + len(out)}")
            done += got


def _map(file: Path | None, rows: int, dim: int, dtype: np.dtype[Any]) -> NDArray[Any]:
    """The first ``rows`` rows of ``file``, memory-mapped read-only (nothing is read yet)."""
    if file is None or rows == 0:
        return np.zeros((0, dim), dtype=dtype)
    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), rows * dim * dtype.itemsize, access=mmap.ACCESS_READ)
    # The re-rank reads scattered rows: read-ahead around each would only evict other pages.
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype).reshape(rows, dim)


def _rows_of(table: NDArray[np.int32], keys: Keys) -> NDArray[np.int64]:
    if len(table) == 0:
        return np.full(keys.shape, -1, dtype=np.int64)
    inside = (keys >= 0) & (keys < len(table))
    return np.where(inside, table[np.where(inside, keys, 0)], -1).astype(np.int64)


def _nlist_for(n: int) -> int:
    """A power of two >= sqrt(n), with at least 39 training points per list (FAISS's floor)."""
    nlist = 1 << max(0, math.ceil(math.log2(math.sqrt(max(n, 1)))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def _pq_layout(dim: int, code_bytes: int) -> tuple[int, int]:
    """(padded dim, 4-bit sub-quantizers): the most sub-quantizers within ``code_bytes`` that
    split the dims evenly, each over at least 2 dims. A dim with no divisor near that budget
    (289 = 17 x 17 has only 17, and 17 codes lose a tenth of recall@100) is padded with zeros
    to the nearest dim that has one (290: 58)."""

    def most(d: int) -> int:
        limit = max(1, min(2 * code_bytes, d // 2))
        return max(m for m in range(1, limit + 1) if d % m == 0)

    wanted = min(code_bytes, dim // 4)  # at least half the budget, or 4 dims per code
    for padded in range(dim, dim + 64):
        if most(padded) >= wanted:
            return padded, most(padded)
    return dim, most(dim)


def _keep_keys(allowed: NDArray[np.bool_] | None, exclude: Collection[int]) -> KeepKeys | None:
    """The same filter as ``id_selector``, as a function of an array of keys."""
    if allowed is None and not len(exclude):
        return None
    banned = as_keys(exclude) if len(exclude) else None

    def keep(keys: Keys) -> NDArray[np.bool_]:
        ok = np.ones(len(keys), dtype=bool)
        if allowed is not None:
            inside = keys < len(allowed)
            ok = inside & np.asarray(allowed, dtype=bool)[np.where(inside, keys, 0)]
        if banned is not None:
            ok &= ~np.isin(keys, banned)
        return ok

    return keep
