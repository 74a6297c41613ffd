"""Large catalogs: the compressed index (IVF + 4-bit PQ in RAM, exact re-rank from memory-mapped
vectors) at up to 10M vectors on one machine.

Synthetic vectors (see ``Mixture``) are generated chunk by chunk from a seed and streamed into
``CompressedIndex.build``; the exact top-100 of held-out queries is computed from the same
float32 chunks as they pass, before they are stored as float16. Then, in the same run:

* build time per stage (write, train, add, tune) and the build's peak RSS;
* RAM per vector: snapshot bytes / n, and the anonymous-memory growth of a fresh process that
  loads the snapshot (the vectors file is mapped, so it shows as file-backed pages only);
* recall@100 of the index against the exact top-100 (float32 vectors, brute force);
* single-query latency p50 / p99 on 1 thread, first with the vectors file in the page cache
  (warm: the build just wrote it; read through if it was evicted; residency checked with
  mincore), last with it evicted and the snapshot loaded afresh (cold);
* the baseline: exact brute-force search over the same memory-mapped vectors, 1 thread, p50,
  and the compressed index's speed-up over it;
* up to ``--ivf-flat-limit`` vectors (default 2M: it holds them all as float32 in RAM), the
  catalog's in-memory index, IVF-Flat with 4 sqrt(n) lists and ``nprobe`` tuned to the same
  recall target: build time, recall@100 and warm single-query latency on the same queries,
  which is where the catalog switches from one to the other (``IndexPolicy.compressed_limit``).

    python benchmarks/large_index.py --vectors 200000 --json OUT.json      # about a minute
    python benchmarks/large_index.py --vectors 10000000 --dim 384 --json OUT.json

Prints a table and writes JSON. Big files go under ``--workdir`` and are deleted at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import math
import mmap
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from indexer.compressed_index import (  # noqa: E402
    CompressedIndex,
    CompressionPolicy,
    exact_search,
)
from indexer.vector_index import IndexPolicy, VectorIndex  # noqa: E402

log = logging.getLogger("benchmarks.large_index")

RECALL_K = 100
QUERY_STREAM = 10**9  # chunk streams 0.. are the catalog; these are held out
LATENCY_STREAM = QUERY_STREAM + 1
TARGETS = {"recall_at_100": 0.90, "p99_ms": 15.0, "ram_bytes_per_vector": 100.0}


# --------------------------------------------------------------------------- synthetic data


@dataclass(frozen=True)
class Mixture:
    """Unit vectors: one of ``clusters`` centres (Zipf-sized, as popular subjects are), plus a
    shared ``rank``-dimensional variation with decaying scales, plus isotropic noise.

    Norms: centres ~1, variation ``spread``, noise ``noise``. At 1M x 384 the nearest neighbour
    of a held-out query sits at cosine ~0.81 and the 100th at ~0.71, mean cosine between random
    vectors ~0.01; uniform vectors on the sphere would have no neighbours worth finding, and
    pure clusters would make any index look perfect.
    """

    dim: int
    seed: int
    clusters: int = 1024
    zipf: float = 0.7
    rank: int = 32
    spread: float = 0.8
    noise: float = 0.4

    @cached_property
    def _model(self) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float64]]:
        rng = np.random.default_rng([self.seed, self.dim, 0])
        centres = rng.normal(size=(self.clusters, self.dim)) / math.sqrt(self.dim)
        scales = np.arange(1, self.rank + 1) ** -0.5
        scales *= self.spread / np.sqrt((scales**2).sum())
        basis = rng.normal(size=(self.rank, self.dim)) / math.sqrt(self.dim) * scales[:, None]
        weights = 1.0 / np.arange(1, self.clusters + 1) ** self.zipf
        return centres.astype(np.float32), basis.astype(np.float32), weights / weights.sum()

    def chunk(self, stream: int, count: int) -> NDArray[np.float32]:
        """``count`` vectors of stream ``stream``, float32 (count, dim), L2-normalised;
        the same stream always gives the same vectors."""
        centres, basis, weights = self._model
        rng = np.random.default_rng([self.seed, self.dim, 1, stream])
        x = centres[rng.choice(self.clusters, size=count, p=weights)]
        x += rng.standard_normal((count, self.rank), dtype=np.float32) @ basis
        x += rng.standard_normal((count, self.dim), dtype=np.float32) * np.float32(
            self.noise / math.sqrt(self.dim)
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


class GroundTruth:
    """Exact top-k by inner product of ``queries``, updated chunk by chunk."""

    def __init__(self, queries: NDArray[np.float32], k: int) -> None:
        self.queries = queries
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.keys = np.full((len(queries), k), -1, dtype=np.int64)

    def update(self, keys: NDArray[np.int64], vectors: NDArray[np.float32]) -> None:
        s, found = exact_search(vectors, keys, self.queries, self.k)
        scores = np.hstack([self.scores, s])
        found = np.hstack([self.keys, found])
        top = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(scores, top, 1)
        self.keys = np.take_along_axis(found, top, 1)


def stream(
    mix: Mixture, n: int, chunk: int, truth: GroundTruth
) -> Iterator[tuple[NDArray[np.int64], NDArray[np.float32]]]:
    """(keys, vectors) chunks of the catalog (keys 0..n-1), feeding ``truth`` on the way; the
    next chunk is generated in a thread while the consumer works on this one."""
    starts = list(range(0, n, chunk))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(mix.chunk, 0, min(chunk, n)) if starts else None
        for i, start in enumerate(starts):
            assert pending is not None
            vectors = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(mix.chunk, i + 1, min(chunk, n - starts[i + 1]))
            keys = np.arange(start, start + len(vectors), dtype=np.int64)
            truth.update(keys, vectors)
            if (i + 1) % max(1, len(starts) // 20) == 0:
                log.info("streamed %d / %d vectors", start + len(vectors), n)
            yield keys, vectors


# --------------------------------------------------------------------------- memory and cache


def rss_kib() -> dict[str, int]:
    """RssAnon and RssFile of this process, KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            out[name] = int(value.split()[0])
    return out


class PeakAnon:
    """Samples RssAnon every 0.2 s while in the ``with`` block; ``kib`` is the highest seen.

    The process's peak RSS (``ru_maxrss``) also counts the pages of the memory-mapped vectors
    file that the build reads back, which are page cache, not memory it holds.
    """

    def __init__(self) -> None:
        self.kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.kib = max(self.kib, rss_kib()["RssAnon"])
            if self._stop.wait(0.2):
                return


def resident_fraction(path: Path) -> float:
    """Fraction of ``path``'s pages in the page cache (mincore over a fresh mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return float((np.frombuffer(bytes(vec), dtype=np.uint8) & 1).mean())
        finally:
            libc.munmap(addr, size)


def evict(path: Path) -> None:
    """Drop ``path``'s unmapped pages from the page cache (only this file's)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_through(path: Path) -> float:
    """Read ``path`` sequentially so it sits in the page cache; seconds taken."""
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - started


# --------------------------------------------------------------------------- measurements


@dataclass
class BuildResult:
    vectors: int
    dim: int
    vector_dtype: str
    build_s: float
    write_s: float
    train_s: float
    add_s: float
    tune_s: float
    peak_rss_mib: float
    peak_rss_anon_mib: float
    snapshot_bytes: int
    vectors_file_bytes: int
    kind: str
    nprobe: int | None
    refine_factor: int | None
    tuned_recall: float | None


@dataclass
class Latency:
    queries: int
    resident_before: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    minor_faults_per_query: float
    major_faults_per_query: float


@dataclass
class IvfFlatResult:
    kind: str
    nprobe: int | None
    build_s: float
    recall_at_100: float
    p50_ms: float
    p99_ms: float


@dataclass
class EvalResult:
    load_s: float
    rss_anon_growth_bytes_per_vector: float
    rss_anon_after_searches_bytes_per_vector: float
    recall_at_100: float
    exact_stored_recall_at_100: float
    cold: Latency
    warm: Latency
    warm_read_s: float
    exact_p50_ms: float
    exact_queries: int
    speedup_p50: float
    filtered_recall_at_100: float
    filtered_p50_ms: float
    filtered_p99_ms: float
    nn1_cosine: float
    nn100_cosine: float
    ivf_flat: IvfFlatResult | None = None


@dataclass
class Report:
    build: BuildResult
    evaluation: EvalResult
    ram_bytes_per_vector: float
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    command: str = ""


def measure_build(args: argparse.Namespace) -> BuildResult:
    mix = Mixture(args.dim, args.seed)
    truth = GroundTruth(mix.chunk(QUERY_STREAM, args.queries), RECALL_K)
    policy = IndexPolicy(recall_target=args.recall_target)
    compression = _compression(args)
    index = CompressedIndex(args.dim, policy, compression, workdir=args.workdir)
    started = time.perf_counter()
    with PeakAnon() as peak:
        stats = index.build(stream(mix, args.vectors, args.chunk, truth))
    build_s = time.perf_counter() - started
    snapshot = args.workdir / "index.snapshot"
    index.save(snapshot)
    info = index.info
    vectors_file = index.vectors_file
    assert vectors_file is not None
    index.close()
    np.save(args.workdir / "truth_keys.npy", truth.keys)
    np.save(args.workdir / "truth_scores.npy", truth.scores)
    return BuildResult(
        vectors=args.vectors,
        dim=args.dim,
        vector_dtype=args.vector_dtype,
        build_s=build_s,
        write_s=stats.write_s,
        train_s=stats.train_s,
        add_s=stats.add_s,
        tune_s=stats.tune_s,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_rss_anon_mib=peak.kib / 1024,
        snapshot_bytes=snapshot.stat().st_size,
        vectors_file_bytes=vectors_file.stat().st_size,
        kind=info.kind,
        nprobe=info.nprobe,
        refine_factor=info.refine_factor,
        tuned_recall=info.measured_recall,
    )


def _compression(args: argparse.Namespace) -> CompressionPolicy:
    # Mapped vectors by default: the catalog reads them into RAM only up to 2 GiB a space, and
    # this benchmark is about the spaces past that (--ram-vectors-bytes to measure the other).
    return CompressionPolicy(
        code_bytes=args.code_bytes,
        vector_dtype=args.vector_dtype,
        ram_vectors_bytes=args.ram_vectors_bytes,
    )


def recall(found: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    return float(
        np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def time_queries(
    index: CompressedIndex, queries: NDArray[np.float32], vectors_file: Path, **filters: Any
) -> Latency:
    resident = resident_fraction(vectors_file)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for q in queries:
        started = time.perf_counter()
        index.search(q[None, :], RECALL_K, **filters)
        times.append(time.perf_counter() - started)
    after = resource.getrusage(resource.RUSAGE_SELF)
    ms = np.asarray(times) * 1000
    return Latency(
        queries=len(queries),
        resident_before=resident,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        minor_faults_per_query=(after.ru_minflt - before.ru_minflt) / len(queries),
        major_faults_per_query=(after.ru_majflt - before.ru_majflt) / len(queries),
    )


def evaluate(args: argparse.Namespace) -> EvalResult:
    """Runs in a fresh process: load the snapshot, then recall, latency and the baseline."""
    import faiss

    n = args.vectors
    mix = Mixture(args.dim, args.seed)
    queries = mix.chunk(QUERY_STREAM, args.queries)
    latency_queries = mix.chunk(LATENCY_STREAM, args.latency_queries + args.cold_queries + 200)
    truth = np.load(args.workdir / "truth_keys.npy")
    truth_scores = np.load(args.workdir / "truth_scores.npy")
    snapshot = args.workdir / "index.snapshot"

    before = rss_kib()
    started = time.perf_counter()
    index = CompressedIndex.load(snapshot, args.dim, {}, IndexPolicy(), _compression(args))
    load_s = time.perf_counter() - started
    loaded = rss_kib()
    vectors_file = index.vectors_file
    assert vectors_file is not None

    # Warm: the build just wrote the file, so it is normally still in the page cache.
    warm_read_s = 0.0
    if resident_fraction(vectors_file) < 0.99:
        warm_read_s = read_through(vectors_file)
    rest = latency_queries[args.cold_queries :]
    time_queries(index, rest[:200], vectors_file)  # warm-up: maps the pages it touches
    warm = time_queries(index, rest[200:], vectors_file)
    log.info("warm p50 %.2f ms p99 %.2f ms", warm.p50_ms, warm.p99_ms)
    after = rss_kib()

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    _, found = index.search(queries, RECALL_K)
    ann_recall = recall(found, truth)
    log.info("recall@%d %.4f", RECALL_K, ann_recall)

    # A filter allowing 10 % of the keys: recall against exact search under the same filter.
    rng = np.random.default_rng([args.seed, 7])
    allowed = rng.random(n) < 0.1
    filtered_queries = queries[: min(100, len(queries))]
    _, found = index.search(filtered_queries, RECALL_K, allowed=allowed)
    row_keys = np.arange(n, dtype=np.int64)
    mapped = np.memmap(vectors_file, dtype=args.vector_dtype, mode="r", shape=(n, args.dim))
    _, filtered_truth = exact_search(
        mapped, row_keys, filtered_queries, RECALL_K, keep=lambda keys: allowed[keys]
    )
    filtered_recall = recall(found, filtered_truth)
    filtered = time_queries(index, rest[200:400], vectors_file, allowed=allowed)
    log.info("10 %% allowed: recall %.4f p50 %.2f ms", filtered_recall, filtered.p50_ms)

    # Baseline: exact search over the same memory-mapped vectors, one thread, page cache warm.
    faiss.omp_set_num_threads(1)
    exact_ms = []
    for q in queries[: args.exact_queries]:
        started = time.perf_counter()
        exact_search(mapped, row_keys, q[None, :], RECALL_K)
        exact_ms.append((time.perf_counter() - started) * 1000)
    exact_p50 = float(np.percentile(exact_ms, 50))
    log.info("exact p50 %.0f ms", exact_p50)
    # What storing float16 costs: exact search over the file against the float32 truth.
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    exact16 = recall(exact_search(mapped, row_keys, queries, RECALL_K)[1], truth)
    log.info("exact search over the stored vectors: recall@%d %.4f", RECALL_K, exact16)

    ivf_flat = None
    if n <= args.ivf_flat_limit:
        stored = np.asarray(mapped, dtype=np.float32)
        ivf_flat = measure_ivf_flat(args, stored, queries, truth, rest[100:])
        del stored
        log.info("IVF-Flat: recall %.4f p50 %.2f ms", ivf_flat.recall_at_100, ivf_flat.p50_ms)

    # Cold: unmapped, this file's pages evicted, a fresh load; each query reads its candidates.
    index.close()
    del index, mapped
    evict(vectors_file)
    index = CompressedIndex.load(snapshot, args.dim, {}, IndexPolicy(), _compression(args))
    cold = time_queries(index, latency_queries[: args.cold_queries], vectors_file)
    log.info("cold p50 %.1f ms p99 %.1f ms", cold.p50_ms, cold.p99_ms)
    index.close()
    return EvalResult(
        load_s=load_s,
        rss_anon_growth_bytes_per_vector=(loaded["RssAnon"] - before["RssAnon"]) * 1024 / n,
        rss_anon_after_searches_bytes_per_vector=(after["RssAnon"] - before["RssAnon"]) * 1024 / n,
        recall_at_100=ann_recall,
        exact_stored_recall_at_100=exact16,
        cold=cold,
        warm=warm,
        warm_read_s=warm_read_s,
        exact_p50_ms=exact_p50,
        exact_queries=len(exact_ms),
        speedup_p50=exact_p50 / warm.p50_ms,
        filtered_recall_at_100=filtered_recall,
        filtered_p50_ms=filtered.p50_ms,
        filtered_p99_ms=filtered.p99_ms,
        nn1_cosine=float(truth_scores[:, 0].mean()),
        nn100_cosine=float(truth_scores[:, -1].mean()),
        ivf_flat=ivf_flat,
    )


def measure_ivf_flat(
    args: argparse.Namespace,
    vectors: NDArray[np.float32],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    latency_queries: NDArray[np.float32],
) -> IvfFlatResult:
    """The catalog's in-memory index over the same vectors (float32 copies of the stored ones):
    build time, recall@100 against the same exact top-100, and warm single-query latency on
    1 thread (after 100 warm-up queries), as for the compressed index."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = VectorIndex(args.dim, IndexPolicy(recall_target=args.recall_target, exact_limit=0))
    started = time.perf_counter()
    index.rebuild(np.arange(len(vectors), dtype=np.int64), vectors)
    build_s = time.perf_counter() - started
    _, found = index.search(queries, RECALL_K)
    faiss.omp_set_num_threads(1)
    ms = []
    for i, q in enumerate(latency_queries):
        started = time.perf_counter()
        index.search(q[None, :], RECALL_K)
        if i >= 100:
            ms.append((time.perf_counter() - started) * 1000)
    info = index.info
    return IvfFlatResult(
        kind=info.kind,
        nprobe=info.nprobe,
        build_s=build_s,
        recall_at_100=recall(found, truth),
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
    )


# --------------------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    import faiss

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "loadavg": os.getloadavg(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def print_table(report: Report) -> None:
    b, e = report.build, report.evaluation
    rows = [
        ("vectors x dim", f"{b.vectors:,} x {b.dim}"),
        ("index", f"{b.kind}, nprobe {b.nprobe}, refine x{b.refine_factor}"),
        (
            "build",
            f"{b.build_s:.0f} s (write {b.write_s:.0f}, train {b.train_s:.0f}, "
            f"add {b.add_s:.0f}, tune {b.tune_s:.0f}); peak RSS {b.peak_rss_mib:,.0f} MiB, "
            f"of which anonymous {b.peak_rss_anon_mib:,.0f} MiB (the rest: mapped vectors file)",
        ),
        ("snapshot bytes / vector", f"{b.snapshot_bytes / b.vectors:.1f}"),
        (
            "RSS growth / vector",
            f"{e.rss_anon_growth_bytes_per_vector:.1f} after load, "
            f"{e.rss_anon_after_searches_bytes_per_vector:.1f} after the single-query runs",
        ),
        (
            "vectors file",
            f"{b.vector_dtype}, {b.vectors_file_bytes / 2**30:.2f} GiB on disk, memory-mapped",
        ),
        (
            "recall@100 vs exact",
            f"{e.recall_at_100:.4f} (tuning queries {b.tuned_recall:.3f}; exact search over the "
            f"stored {b.vector_dtype} vectors: "
            f"{e.exact_stored_recall_at_100:.4f})",
        ),
        (
            "latency warm, 1 thread",
            f"p50 {e.warm.p50_ms:.2f} ms, p99 {e.warm.p99_ms:.2f} ms "
            f"({e.warm.queries} queries; file {e.warm.resident_before:.0%} in page cache; "
            f"{e.warm.minor_faults_per_query:.1f} minor faults / query"
            + (f"; read into it first in {e.warm_read_s:.0f} s)" if e.warm_read_s else ")"),
        ),
        (
            "latency cold, 1 thread",
            f"p50 {e.cold.p50_ms:.1f} ms, p99 {e.cold.p99_ms:.1f} ms ({e.cold.queries} queries; "
            f"file {e.cold.resident_before:.0%} in page cache; "
            f"{e.cold.major_faults_per_query:.1f} major faults / query)",
        ),
        (
            "filter: 10 % allowed",
            f"recall@100 {e.filtered_recall_at_100:.4f}, p50 {e.filtered_p50_ms:.2f} ms, "
            f"p99 {e.filtered_p99_ms:.2f} ms",
        ),
        (
            "baseline: exact over mmap",
            f"p50 {e.exact_p50_ms:,.0f} ms (1 thread, {e.exact_queries} queries) -> "
            f"speed-up {e.speedup_p50:,.0f}x at p50",
        ),
        ("neighbours", f"mean cosine of 1st {e.nn1_cosine:.3f}, 100th {e.nn100_cosine:.3f}"),
    ]
    if e.ivf_flat is not None:
        f = e.ivf_flat
        rows.append(
            (
                "in-RAM IVF-Flat instead",
                f"{f.kind}, nprobe {f.nprobe}: recall@100 {f.recall_at_100:.4f}, warm p50 "
                f"{f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms (1 thread); build {f.build_s:.0f} s; "
                f"{4 * b.dim} bytes of RAM / vector",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
    for name, target in report.targets.items():
        verdict = "met" if target["met"] else "MISSED"
        print(f"target {name}: {target['value']:.4g} vs {target['target']:g} -> {verdict}")
    print(f"machine: {report.machine['cpu']}, {report.machine['cpus']} CPUs, load {_load()}")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min)"


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=100_000, help="vectors per streamed chunk")
    parser.add_argument("--queries", type=int, default=500, help="held-out recall queries")
    parser.add_argument("--latency-queries", type=int, default=1000)
    parser.add_argument("--cold-queries", type=int, default=100)
    parser.add_argument("--exact-queries", type=int, default=5, help="baseline queries")
    parser.add_argument("--recall-target", type=float, default=0.95, help="tuning target")
    parser.add_argument("--code-bytes", type=int, default=48)
    parser.add_argument("--vector-dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ram-vectors-bytes",
        type=int,
        default=0,
        help="read the vectors into RAM up to this size instead of mapping them",
    )
    parser.add_argument(
        "--ivf-flat-limit",
        type=int,
        default=2_000_000,
        help="also measure the in-RAM IVF-Flat index up to this many vectors",
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks/out/large_index")
    parser.add_argument("--keep", action="store_true", help="keep the vectors and snapshot")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.evaluate:
        result = evaluate(args)
        (args.workdir / "evaluation.json").write_text(json.dumps(asdict(result)))
        return
    try:
        build = measure_build(args)
        log.info("built in %.0f s; evaluating in a fresh process", build.build_s)
        subprocess.run([sys.executable, __file__, *argv, "--evaluate"], check=True)
        raw = json.loads((args.workdir / "evaluation.json").read_text())
        raw["cold"], raw["warm"] = Latency(**raw["cold"]), Latency(**raw["warm"])
        if raw.get("ivf_flat"):
            raw["ivf_flat"] = IvfFlatResult(**raw["ivf_flat"])
        evaluation = EvalResult(**raw)
    finally:
        if not args.keep:
            for pattern in ("index.snapshot*", "*.vectors.work", "truth_*.npy", "evaluation.json"):
                for path in args.workdir.glob(pattern):
                    path.unlink()
    ram = max(build.snapshot_bytes / build.vectors, evaluation.rss_anon_growth_bytes_per_vector)
    values = {
        "recall_at_100": evaluation.recall_at_100,
        "p99_ms": evaluation.warm.p99_ms,
        "ram_bytes_per_vector": ram,
    }
    report = Report(
        build=build,
        evaluation=evaluation,
        ram_bytes_per_vector=ram,
        targets={
            name: {
                "value": values[name],
                "target": target,
                "met": values[name] >= target
                if name == "recall_at_100"
                else values[name] <= target,
            }
            for name, target in TARGETS.items()
        },
        machine=machine(),
        command=" ".join(["python", "benchmarks/large_index.py", *argv]),
    )
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
