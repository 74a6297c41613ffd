"""Service benchmark: /v1/feed latency and throughput on loopback, and ANN recall, per catalog size.

For each size a catalog is built (once, cached under ``--cache``) with the offline profile's
spaces and synthetic vectors shaped like real embeddings (see ``Embeddings``). Then, in the
same run:

* recall@100 of the catalog's index (the tuned IVF past 100k items) against exact search over
  the same vectors, on held-out queries from the same distribution, and the time per query of
  each (the exact search is the baseline);
* the engine's own share of a feed request, in process: CPU and wall time of ``Engine.feed``;
* the HTTP service in a subprocess (``create_app`` under uvicorn, rate limit off), loaded by a
  minimal keep-alive HTTP/1.1 client so the load generator takes little CPU from the server:
  a closed loop of ``--concurrency`` clients gives the most requests/s (and the server's CPU
  per request), an open loop at 70 % of that rate and one at ``--rate`` requests/s (Poisson
  arrivals, latency from the scheduled send time, so queueing is counted; the first 2 s at
  the rate are not counted) give p50 / p99 latency; ``/healthz`` under the same open loop is
  the baseline for what the framework alone costs. Each open loop after the first waits until
  the server has drained the last one;
* the closed loop and the 70 % loop again against ``serve --workers N`` (``--workers``);
* with each server, a closed loop of the web page's traffic: every client fetches a page, then
  posts the page's dwell times (``/v1/feedback``), so every page is steered; pairs/s and the
  server's CPU per pair, against the scroll's CPU per page in the same run.

    python benchmarks/service.py                      # 100k and 1M items
    python benchmarks/service.py --items 20000 --duration 5     # CI-sized

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from indexer.catalog import Catalog, NewItem  # noqa: E402
from indexer.encoders import EncoderSpec, l2_normalise, profile_specs  # noqa: E402
from indexer.records import DumpRecord  # noqa: E402

log = logging.getLogger("benchmarks.service")

BATCH = 20_000
RECALL_K = 100
WORDS = (
    "portrait landscape city forest ocean neon cyberpunk castle dragon robot flower cat dog "
    "sunset night snow desert mountain river girl knight ship space star galaxy ruins temple "
    "painting photo anime watercolor sketch cinematic detailed masterpiece soft dramatic"
).split()
TAGS = [f"tag{i}" for i in range(200)]
BASE_MODELS = ("SD 1.5", "SDXL 1.0", "Pony", "Flux.1 D")


# --------------------------------------------------------------------------- synthetic catalog


@dataclass(frozen=True)
class Embeddings:
    """Unit vectors of a Gaussian on a ``rank``-dimensional subspace plus isotropic noise.

    With rank 12 and noise 0.2 the nearest neighbours sit at cosines like those of real image
    embeddings (about 0.89 for the first, 0.77 for the 100th) and an IVF index needs a few
    percent of its lists probed for recall@100 >= 0.95, as on real data; clustered or uniform
    vectors would make it look much better or much worse than it is.
    """

    dim: int
    rank: int
    noise: float
    seed: int

    def basis(self) -> NDArray[np.float32]:
        rng = np.random.default_rng([self.seed, self.dim, 0])
        return rng.normal(size=(self.rank, self.dim)).astype(np.float32) / math.sqrt(self.rank)

    def sample(self, stream: int, count: int) -> NDArray[np.float32]:
        """``count`` vectors of stream ``stream`` (deterministic: same stream, same vectors)."""
        rng = np.random.default_rng([self.seed, self.dim, 1, stream])
        signal = rng.normal(size=(count, self.rank)).astype(np.float32) @ self.basis()
        return l2_normalise(signal + self.noise * rng.normal(size=(count, self.dim)))


def embeddings(
    specs: dict[str, EncoderSpec], rank: int, noise: float, seed: int
) -> dict[str, Embeddings]:
    return {space: Embeddings(spec.dim, rank, noise, seed) for space, spec in specs.items()}


def build_catalog(path: Path, items: int, rank: int, noise: float, seed: int) -> float:
    """Build the synthetic catalog at ``path`` unless a finished one is there; seconds spent."""
    done = path / "BENCHMARK_COMPLETE"
    if done.exists():
        return float(done.read_text())
    if path.exists():
        shutil.rmtree(path)
    started = time.perf_counter()
    specs = profile_specs("offline", {})
    mix = embeddings(specs, rank, noise, seed)
    path.mkdir(parents=True)
    image = path / "placeholder.png"
    image.write_bytes(_tiny_png())
    rng = np.random.default_rng([seed, 2])
    catalog = Catalog.create_or_open(path, specs)
    with catalog:
        for batch, start in enumerate(range(0, items, BATCH)):
            count = min(BATCH, items - start)
            records = [_new_item(start + i, image, rng) for i in range(count)]
            vectors = {space: m.sample(batch, count) for space, m in mix.items()}
            catalog.add(records, vectors)
            log.info("added %d / %d items", start + count, items)
        catalog.checkpoint()
    elapsed = time.perf_counter() - started
    done.write_text(f"{elapsed:.1f}")
    return elapsed


def _new_item(i: int, image: Path, rng: np.random.Generator) -> NewItem:
    words = rng.choice(len(WORDS), size=8, replace=False)
    tags = rng.choice(len(TAGS), size=4, replace=False)
    record = DumpRecord(
        id=f"b{i}",
        image_path=image,
        prompt=", ".join(WORDS[w] for w in words),
        tags=tuple(TAGS[t] for t in tags),
        nsfw_level=int(rng.integers(0, 3)),
        base_model=BASE_MODELS[i % len(BASE_MODELS)],
    )
    return NewItem(
        record=record,
        file=str(image),
        content_hash=f"bench{i}",
        file_size=1,
        file_mtime_ns=1,
        width=512,
        height=512,
    )


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), "gray").save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------- recall


@dataclass
class RecallResult:
    index: str
    nprobe: int | None
    recall_at_100: float
    ann_ms_per_query: float
    exact_ms_per_query: float


def measure_recall(
    path: Path, items: int, rank: int, noise: float, seed: int, queries: int
) -> RecallResult:
    """recall@100 of the catalog's primary-space index against exact search, same queries."""
    import faiss

    specs = profile_specs("offline", {})
    mix = embeddings(specs, rank, noise, seed)["visual"]
    exact = faiss.IndexFlatIP(mix.dim)
    for batch, start in enumerate(range(0, items, BATCH)):
        exact.add(mix.sample(batch, min(BATCH, items - start)))
    held_out = mix.sample(10**6, queries)
    with Catalog.open(path) as catalog:
        info = catalog.indexes["visual"].info
        started = time.perf_counter()
        found = [catalog.search("visual", q[None, :], RECALL_K)[1][0] for q in held_out]
        ann_s = time.perf_counter() - started
        started = time.perf_counter()
        truth = [exact.search(q[None, :], RECALL_K)[1][0] for q in held_out]
        exact_s = time.perf_counter() - started
    # Catalog keys are 1-based insertion order (SQLite AUTOINCREMENT); exact rows are 0-based.
    hits = [
        len(set(f.tolist()) & {int(t) + 1 for t in row})
        for f, row in zip(found, truth, strict=True)
    ]
    return RecallResult(
        index=info.kind,
        nprobe=info.nprobe,
        recall_at_100=float(np.mean(hits) / RECALL_K),
        ann_ms_per_query=1000 * ann_s / queries,
        exact_ms_per_query=1000 * exact_s / queries,
    )


# --------------------------------------------------------------------------- engine share


@dataclass
class EngineShare:
    feed_cpu_ms_p50: float
    feed_cpu_ms_p99: float
    feed_wall_ms_p50: float
    feed_wall_ms_p99: float
    feed_cpu_ms_mean: float = float("nan")
    # A scroll without feedback takes most pages from an earlier search's ranking: the share
    # of its pages that searched, and the baseline that searches and re-ranks for every page
    # (reuse_ranking off), measured call for call alongside.
    feed_searched_share: float = float("nan")
    every_page_cpu_ms_p50: float = float("nan")
    every_page_cpu_ms_mean: float = float("nan")
    # Sessions that send dwell feedback after every page, as the web page does: their feed
    # pages score candidates against a steered posterior, and the feedback call steers.
    steered_feed_cpu_ms_p50: float = float("nan")
    steered_feed_cpu_ms_p99: float = float("nan")
    feedback_cpu_ms_p50: float = float("nan")
    feedback_cpu_ms_p99: float = float("nan")
    # The same, for sessions whose filters exclude a tag (on ~2 % of the items), alternating
    # call for call with the unfiltered ones: what a filter adds to a page.
    filtered_feed_cpu_ms_p50: float = float("nan")
    # The shared VM's speed swings up to 2x from minute to minute: CPU of a fixed reference
    # workload, run between blocks of engine calls, says how fast the box was meanwhile.
    reference_cpu_ms_p50: float = float("nan")


def reference_cpu_ms() -> float:
    """CPU ms of a fixed workload shaped like a page's (Python loops, small products)."""
    rng = np.random.default_rng(0)
    rows, query = rng.random((200, 384), dtype=np.float32), rng.random(384, dtype=np.float32)
    started = time.process_time()
    for _ in range(2000):
        rows @ query
    total = 0
    for i in range(300_000):
        total += i
    return (time.process_time() - started) * 1000


def measure_engine(path: Path, items: int, sessions: int, calls: int, seed: int) -> EngineShare:
    """CPU and wall time of ``Engine.feed`` in this process (no HTTP), one call at a time:
    first sessions that only scroll (alternating, call for call, with an engine that searches
    for every page), then sessions that send a page's dwell times after each page
    (log-normal, median 1.5 s), with the CPU of ``Engine.feedback`` on its own, alternating
    with the same for sessions whose filters exclude a tag."""
    import uuid

    from recommender.api import FeedbackEvent, ItemQuery
    from recommender.engine import Engine, EngineConfig, one_blas_thread
    from recommender.retrieve import Filters

    one_blas_thread()  # as the service does
    rng = np.random.default_rng([seed, 3])
    engine = Engine.from_catalog(path, seed=seed)
    every_page = Engine(
        engine.catalog, engine.encoders, EngineConfig(reuse_ranking=False), seed=seed
    )
    searches = _count_searches(engine.catalog)
    try:

        def start(
            which: Engine, starts: NDArray[np.int64], filters: Filters | None = None
        ) -> list[str]:
            return [which.search(ItemQuery(f"b{i}"), filters=filters).session_id for i in starts]

        def steer(session_id: str) -> tuple[float, float]:
            """CPU seconds of a page, and of the feedback on its dwell times."""
            c0 = time.process_time()
            page = engine.feed(session_id)
            fed = time.process_time() - c0
            dwell = np.exp(rng.normal(math.log(1500), 0.8, size=len(page.items)))
            events = [
                FeedbackEvent(uuid.uuid4().hex, item.id, float(ms))
                for item, ms in zip(page.items, dwell, strict=True)
            ]
            c0 = time.process_time()
            engine.feedback(page.session_id, events)
            return fed, time.process_time() - c0

        starts = rng.integers(items, size=sessions)
        ids, baseline_ids = start(engine, starts), start(every_page, starts)
        cpu, wall, baseline, reference = [], [], [], []
        searched = 0
        for n in range(calls):
            if n % 50 == 0:
                reference.append(reference_cpu_ms())
            before = searches[0]
            c0, w0 = time.process_time(), time.perf_counter()
            engine.feed(ids[n % len(ids)])
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            searched += searches[0] > before
            c0 = time.process_time()
            every_page.feed(baseline_ids[n % len(ids)])
            baseline.append(time.process_time() - c0)
        ids = start(engine, rng.integers(items, size=sessions))
        no_tag = Filters(tags_excluded=(TAGS[0],))
        filtered_ids = start(engine, rng.integers(items, size=sessions), no_tag)
        steered, feedback, filtered = [], [], []
        for n in range(calls):
            if n % 50 == 0:
                reference.append(reference_cpu_ms())
            fed, fed_back = steer(ids[n % len(ids)])
            steered.append(fed)
            feedback.append(fed_back)
            filtered.append(steer(filtered_ids[n % len(ids)])[0])
    finally:
        engine.close()
    return EngineShare(
        feed_cpu_ms_p50=_ms(cpu, 50),
        feed_cpu_ms_p99=_ms(cpu, 99),
        feed_wall_ms_p50=_ms(wall, 50),
        feed_wall_ms_p99=_ms(wall, 99),
        feed_cpu_ms_mean=float(np.mean(cpu) * 1000),
        feed_searched_share=searched / max(calls, 1),
        every_page_cpu_ms_p50=_ms(baseline, 50),
        every_page_cpu_ms_mean=float(np.mean(baseline) * 1000),
        steered_feed_cpu_ms_p50=_ms(steered, 50),
        steered_feed_cpu_ms_p99=_ms(steered, 99),
        feedback_cpu_ms_p50=_ms(feedback, 50),
        feedback_cpu_ms_p99=_ms(feedback, 99),
        filtered_feed_cpu_ms_p50=_ms(filtered, 50),
        reference_cpu_ms_p50=float(np.median(reference)),
    )


def _count_searches(catalog: Any) -> list[int]:
    """A counter, in a one-element list, of the catalog's index searches from now on."""
    count = [0]
    search = catalog.search

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return search(*args, **kwargs)

    catalog.search = counted
    return count


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


# --------------------------------------------------------------------------- HTTP load


class Connection:
    """A minimal keep-alive HTTP/1.1 client: a request costs the load generator ~50 µs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    # Share of the box's CPU time its hypervisor gave to other guests meanwhile (Linux "steal"):
    # on this shared VM it reached 40-50 % under load, which halves what two processes can do.
    steal: float = float("nan")
    # CPU the server used per request (all its processes), ms: what bounds req/s on 2 cores.
    server_cpu_ms: float = float("nan")


def cpu_times() -> tuple[int, int]:
    """(steal, total) CPU ticks of the whole box so far, from /proc/stat; (0, 0) elsewhere."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def steal_since(before: tuple[int, int]) -> float:
    steal, total = cpu_times()
    return (steal - before[0]) / (total - before[1]) if total > before[1] else float("nan")


def server_cpu_s(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and its children (the worker processes of
    ``serve --workers``), from /proc; NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            pids = [pid, *map(int, children.read().split())]
        total = 0
        for each in pids:
            with open(f"/proc/{each}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError):
        return float("nan")
    return total / os.sysconf("SC_CLK_TCK")


def wait_until_idle(server: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Return once the server has drained what an earlier phase queued (it keeps computing
    pages whose clients gave up): under a tenth of a core over a second, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server_cpu_s(server.pid)
        time.sleep(1.0)
        used = server_cpu_s(server.pid) - before
        if not used > 0.1:  # NaN (no /proc): the sleep was the wait
            return


async def create_sessions(port: int, count: int, items: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 4])
    conn = await Connection.open(port)
    ids = []
    for _ in range(count):
        body = json.dumps({"image_id": f"b{rng.integers(items)}"}).encode()
        status, answer = await conn.request("POST", "/v1/search", body)
        if status != 200:
            raise RuntimeError(f"search failed: {status} {answer[:200]!r}")
        ids.append(json.loads(answer)["session_id"])
    conn.close()
    return ids


async def closed_loop(port: int, sessions: list[str], clients: int, seconds: float) -> LoadResult:
    """``clients`` clients, each scrolling its own sessions back to back, for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(mine: list[str]) -> None:
        nonlocal errors
        conn = await Connection.open(port)
        n = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _ = await conn.request("GET", f"/v1/feed?session_id={mine[n % len(mine)]}")
            latencies.append(time.perf_counter() - started)
            errors += status != 200
            n += 1
        conn.close()

    started, ticks = time.perf_counter(), cpu_times()
    await asyncio.gather(*(client(sessions[i::clients]) for i in range(clients)))
    result = _load_result(latencies, errors, time.perf_counter() - started)
    result.steal = steal_since(ticks)
    return result


async def feedback_loop(
    port: int, sessions: list[str], clients: int, seconds: float, seed: int
) -> LoadResult:
    """``clients`` clients, each on its own sessions, fetching a page and posting its dwell
    times (log-normal, median 1.5 s) back to back for ``seconds``, as the web page does;
    a request is one page with its feedback, and its latency both calls'."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(mine: list[str], rng: np.random.Generator) -> None:
        nonlocal errors
        conn = await Connection.open(port)
        n = 0
        while time.perf_counter() < deadline:
            session_id = mine[n % len(mine)]
            n += 1
            started = time.perf_counter()
            status, body = await conn.request("GET", f"/v1/feed?session_id={session_id}")
            items = json.loads(body)["items"] if status == 200 else []
            dwell = np.exp(rng.normal(math.log(1500), 0.8, size=len(items)))
            events = [
                {"event_id": os.urandom(12).hex(), "image_id": item["id"], "dwell_ms": float(ms)}
                for item, ms in zip(items, dwell, strict=True)
            ]
            stored = 202
            if events:
                answer = json.dumps({"session_id": session_id, "events": events}).encode()
                stored = (await conn.request("POST", "/v1/feedback", answer))[0]
            latencies.append(time.perf_counter() - started)
            errors += status != 200 or stored != 202
        conn.close()

    rngs = np.random.default_rng([seed, 6]).spawn(clients)
    started, ticks = time.perf_counter(), cpu_times()
    await asyncio.gather(*(client(sessions[i::clients], rngs[i]) for i in range(clients)))
    result = _load_result(latencies, errors, time.perf_counter() - started)
    result.steal = steal_since(ticks)
    return result


class _IdlePaths:
    """The paths no request is using now. ``take`` waits for one and hands out one at random:
    taken in turn, sessions that started together stay in step, so every session's search
    page (one page in three) falls in the same rounds, and those rounds come at 200/s faster
    than one process serves search pages (1M items: p99 34-40 ms in turn, 18-23 ms at random).
    People scrolling do not keep in step."""

    def __init__(self, paths: list[str], rng: np.random.Generator) -> None:
        self._paths = list(paths)
        self._rng = rng
        self._ready = asyncio.Semaphore(len(paths))

    async def take(self) -> str:
        await self._ready.acquire()
        i = int(self._rng.integers(len(self._paths)))
        self._paths[i], self._paths[-1] = self._paths[-1], self._paths[i]
        return self._paths.pop()

    def put_back(self, path: str) -> None:
        self._paths.append(path)
        self._ready.release()


# Arrivals at the rate before an open loop's measured ``seconds``, not counted: the loop meets a
# server that has idled (it waits for the last phase's backlog to drain), and on the 2-vCPU dev
# box the first half-second after that held most of a run's slowest requests (2 workers at
# 200/s: 13 and 14 of the 20 slowest, benchmarks/RESULTS.md).
OPEN_LOOP_WARMUP_S = 2.0


async def open_loop(
    port: int,
    paths: list[str],
    rate: float,
    seconds: float,
    seed: int,
    warmup: float = OPEN_LOOP_WARMUP_S,
) -> LoadResult:
    """Poisson arrivals at ``rate``/s over ``warmup`` + ``seconds``; the latency of those of
    the last ``seconds`` counts, from the scheduled time.

    Each path (a session's feed) is used by one request at a time, as one person scrolls.
    """
    rng = np.random.default_rng([seed, 5])
    span = warmup + seconds
    arrivals = np.cumsum(rng.exponential(1 / rate, size=int(rate * span * 1.5) + 10))
    arrivals = arrivals[arrivals < span]
    idle = _IdlePaths(paths, rng)
    pool: list[Connection] = [await Connection.open(port) for _ in range(32)]
    latencies: list[float] = []
    errors = 0
    t0 = time.perf_counter()
    measured_from = t0 + warmup

    async def one(scheduled: float) -> None:
        nonlocal errors
        path = await idle.take()
        conn = pool.pop() if pool else await Connection.open(port)
        status = 0
        for _attempt in range(2):  # the server closes keep-alive connections idle for 5 s
            try:
                status, _ = await conn.request("GET", path)
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                conn.close()
                conn = await Connection.open(port)
        if scheduled >= measured_from:
            latencies.append(time.perf_counter() - scheduled)
            errors += status != 200
        pool.append(conn)
        idle.put_back(path)

    tasks: dict[asyncio.Task[None], float] = {}
    for at in arrivals:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks[asyncio.create_task(one(t0 + float(at)))] = t0 + float(at)
    # An overloaded server never catches up: stop waiting after as long again, and count what
    # is still queued as failed, with the time it has waited so far as its latency.
    _, unfinished = await asyncio.wait(tasks, timeout=seconds)
    now = time.perf_counter()
    failed = 0
    for task in unfinished:
        task.cancel()
        if tasks[task] >= measured_from:
            latencies.append(now - tasks[task])
            failed += 1
    await asyncio.gather(*unfinished, return_exceptions=True)
    for conn in pool:
        conn.close()
    return _load_result(latencies, errors + failed, now - measured_from)


def _load_result(latencies: list[float], errors: int, seconds: float) -> LoadResult:
    return LoadResult(
        requests=len(latencies),
        errors=errors,
        seconds=round(seconds, 2),
        rps=len(latencies) / seconds if seconds else 0.0,
        p50_ms=_ms(latencies, 50),
        p99_ms=_ms(latencies, 99),
    )


def start_server(path: Path, port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--serve", str(path), "--port", str(port)]
    command += ["--workers", str(workers)]
    return wait_ready(subprocess.Popen(command, cwd=REPO), port)


def wait_ready(
    server: subprocess.Popen[bytes], port: int, timeout: float = 300, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``server`` once its ``/readyz`` answers 200; killed and an error if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None else ""
            raise RuntimeError(f"the server exited with {server.returncode} {tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.3)
    server.kill()
    raise RuntimeError("the server did not become ready")


def serve(path: Path, port: int, workers: int) -> None:
    """The server side: what ``lookalike serve [--workers N]`` runs, rate limiting and the
    access log off."""
    from service.cli import run_server
    from service.settings import Settings

    settings = Settings.model_validate(
        {
            "catalog": path,
            "rate_limit_per_s": 0,
            "host": "127.0.0.1",
            "port": port,
            "workers": workers,
            "access_log": False,
        }
    )
    run_server(settings, what=f"catalog {path}")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --------------------------------------------------------------------------- main


@dataclass
class SizeResult:
    items: int
    build_s: float
    recall: RecallResult
    engine: EngineShare
    max_throughput: LoadResult
    feed_at_rate: LoadResult
    feed_at_70pct: LoadResult
    healthz_at_rate: LoadResult
    # The same scroll served by ``--workers`` processes (None when 1), measured after.
    workers_max_throughput: LoadResult | None = None
    workers_at_70pct: LoadResult | None = None
    # ... and at ``--rate`` (the target: 200 requests/s with p99 <= 30 ms).
    workers_at_rate: LoadResult | None = None
    # The web page's traffic (a page, then its dwell times) with one process and with N.
    with_feedback: LoadResult | None = None
    workers_with_feedback: LoadResult | None = None


def run_size(items: int, args: argparse.Namespace) -> SizeResult:
    path = args.cache / f"catalog-{items}-rank{args.rank}-noise{args.noise}-seed{args.seed}"
    build_s = build_catalog(path, items, args.rank, args.noise, args.seed)
    log.info("catalog of %d items ready (%.0f s to build)", items, build_s)
    recall = measure_recall(path, items, args.rank, args.noise, args.seed, args.queries)
    log.info("recall@100 %.3f (%s nprobe %s)", recall.recall_at_100, recall.index, recall.nprobe)
    engine = measure_engine(path, items, sessions=32, calls=args.engine_calls, seed=args.seed)
    port = free_port()
    server = start_server(path, port)
    try:
        sessions = asyncio.run(create_sessions(port, args.sessions, items, args.seed))
        feed_paths = [f"/v1/feed?session_id={s}" for s in sessions]
        saturated = saturate(server, port, sessions, args)
        carried = 0.7 * saturated.rps  # a load this server can carry, for its latency there
        at_70pct = asyncio.run(open_loop(port, feed_paths, carried, args.duration, args.seed))
        wait_until_idle(server)
        at_rate = asyncio.run(open_loop(port, feed_paths, args.rate, args.duration, args.seed))
        wait_until_idle(server)  # /healthz alone, not behind the overload's backlog
        health = asyncio.run(
            open_loop(port, ["/healthz"] * 64, args.rate, min(5.0, args.duration), args.seed)
        )
        with_feedback = saturate_with_feedback(server, port, items, args)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = SizeResult(items, build_s, recall, engine, saturated, at_rate, at_70pct, health)
    result.with_feedback = with_feedback
    if args.workers > 1:
        (
            result.workers_max_throughput,
            result.workers_at_70pct,
            result.workers_at_rate,
            result.workers_with_feedback,
        ) = measure_workers(items, path, args)
    return result


def saturate(
    server: subprocess.Popen[bytes], port: int, sessions: list[str], args: argparse.Namespace
) -> LoadResult:
    """The closed loop of ``args.concurrency`` clients after a short warm-up, with the
    server's CPU per request."""
    asyncio.run(closed_loop(port, sessions, args.concurrency, min(3.0, args.duration)))
    before = server_cpu_s(server.pid)
    result = asyncio.run(closed_loop(port, sessions, args.concurrency, args.duration))
    result.server_cpu_ms = (server_cpu_s(server.pid) - before) * 1000 / max(result.requests, 1)
    return result


def saturate_with_feedback(
    server: subprocess.Popen[bytes], port: int, items: int, args: argparse.Namespace
) -> LoadResult:
    """The web page's closed loop (``feedback_loop``) on new sessions, after a short
    warm-up, with the server's CPU per page and its feedback."""
    sessions = asyncio.run(create_sessions(port, args.sessions, items, args.seed + 1))
    asyncio.run(feedback_loop(port, sessions, args.concurrency, 2.0, args.seed))
    before = server_cpu_s(server.pid)
    result = asyncio.run(
        feedback_loop(port, sessions, args.concurrency, args.duration, args.seed + 1)
    )
    result.server_cpu_ms = (server_cpu_s(server.pid) - before) * 1000 / max(result.requests, 1)
    return result


def measure_workers(
    items: int, path: Path, args: argparse.Namespace
) -> tuple[LoadResult, LoadResult, LoadResult, LoadResult]:
    """Max requests/s of the closed loop, and latency at 70 % of it and at ``args.rate``,
    with ``args.workers`` serving processes; then the web page's closed loop."""
    port = free_port()
    server = start_server(path, port, args.workers)
    try:
        sessions = asyncio.run(create_sessions(port, args.sessions, items, args.seed))
        feed_paths = [f"/v1/feed?session_id={s}" for s in sessions]
        saturated = saturate(server, port, sessions, args)
        carried = 0.7 * saturated.rps
        at_70pct = asyncio.run(open_loop(port, feed_paths, carried, args.duration, args.seed))
        wait_until_idle(server)
        at_rate = asyncio.run(open_loop(port, feed_paths, args.rate, args.duration, args.seed))
        wait_until_idle(server)
        with_feedback = saturate_with_feedback(server, port, items, args)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return saturated, at_70pct, at_rate, with_feedback


def print_table(results: list[SizeResult], args: argparse.Namespace) -> None:
    columns = (
        ("items", 9),
        ("index", 14),
        ("nprobe", 6),
        ("recall@100", 10),
        ("ann/exact ms", 13),
        ("engine cpu p50/mean/p99", 22),
        ("pages searched", 14),
        ("every page p50/mean", 19),
        ("steered feed/filtered/feedback p50", 34),
        ("ref ms", 6),
        ("max req/s (steal) CPU/req", 25),
        (f"p50/p99 @{args.rate:g}/s", 19),
        ("p50/p99 @70% max", 18),
        ("healthz p99", 11),
        ("page+feedback/s (steal) CPU", 27),
        ("errors", 6),
        (f"{args.workers} workers: max req/s (steal) CPU/req", 36),
        ("p50/p99 @70% max", 16),
        (f"p50/p99 @{args.rate:g}/s", 16),
        ("page+feedback/s (steal) CPU", 27),
    )
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        cells = (
            r.items,
            r.recall.index,
            r.recall.nprobe or "-",
            f"{r.recall.recall_at_100:.3f}",
            f"{r.recall.ann_ms_per_query:.1f} / {r.recall.exact_ms_per_query:.1f}",
            f"{r.engine.feed_cpu_ms_p50:.1f} / {r.engine.feed_cpu_ms_mean:.1f} / "
            f"{r.engine.feed_cpu_ms_p99:.1f}",
            f"{r.engine.feed_searched_share:.0%}",
            f"{r.engine.every_page_cpu_ms_p50:.1f} / {r.engine.every_page_cpu_ms_mean:.1f}",
            f"{r.engine.steered_feed_cpu_ms_p50:.1f} / {r.engine.filtered_feed_cpu_ms_p50:.1f} / "
            f"{r.engine.feedback_cpu_ms_p50:.1f}",
            f"{r.engine.reference_cpu_ms_p50:.0f}",
            _throughput(r.max_throughput),
            f"{r.feed_at_rate.p50_ms:.0f} / {r.feed_at_rate.p99_ms:.0f}",
            f"{r.feed_at_70pct.p50_ms:.0f} / {r.feed_at_70pct.p99_ms:.0f}",
            f"{r.healthz_at_rate.p99_ms:.1f}",
            _throughput(r.with_feedback) if r.with_feedback else "-",
            r.max_throughput.errors
            + r.feed_at_70pct.errors
            + sum(
                w.errors
                for w in (
                    r.with_feedback,
                    r.workers_max_throughput,
                    r.workers_at_70pct,
                    r.workers_at_rate,
                    r.workers_with_feedback,
                )
                if w
            ),
            _throughput(r.workers_max_throughput) if r.workers_max_throughput else "-",
            f"{r.workers_at_70pct.p50_ms:.0f} / {r.workers_at_70pct.p99_ms:.0f}"
            if r.workers_at_70pct
            else "-",
            f"{r.workers_at_rate.p50_ms:.0f} / {r.workers_at_rate.p99_ms:.0f}"
            if r.workers_at_rate
            else "-",
            _throughput(r.workers_with_feedback) if r.workers_with_feedback else "-",
        )
        print(
            " ".join(f"{cell!s:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True))
        )
    print(
        "latency in ms; steal: share of the box's CPU time the hypervisor gave to other guests "
        "during the closed loop; CPU/req: the server's CPU per request in it (all its "
        "processes); pages searched: share of scroll pages that ran a new search "
        "(the rest came from an earlier one's ranking); every page: the same scroll searching "
        "for every page, measured call for call alongside; steered: sessions sending dwell "
        "feedback after every page, filtered: the same excluding a tag on ~2 % of items; "
        "ref ms: CPU of a fixed reference workload between engine calls (the box's speed); "
        "open loops with Poisson arrivals (a queued request's wait counts), after 2 s at the "
        "rate not counted; errors: non-200 answers in the closed loops, the 70% loops and the "
        "workers' loop at the rate; "
        "page+feedback: closed loop of the web page's traffic, a page then its dwell times, "
        "pairs/s and the server's CPU per pair; "
        "N workers: the same scroll served by `serve --workers N`; "
        f"{_loadavg()}"
    )


def _throughput(result: LoadResult) -> str:
    return f"{result.rps:.0f} ({result.steal:.0%}) {result.server_cpu_ms:.1f} ms"


def _loadavg() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return ""
    return f"load average during the run {one:.1f} (1 min), {five:.1f} (5 min)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load phase")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s")
    parser.add_argument("--sessions", type=int, default=128, help="scrolling sessions")
    parser.add_argument("--queries", type=int, default=200, help="held-out recall queries")
    parser.add_argument("--engine-calls", type=int, default=300, help="in-process feed calls")
    parser.add_argument("--rank", type=int, default=12, help="intrinsic dimension of vectors")
    parser.add_argument("--noise", type=float, default=0.2, help="isotropic noise per dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=2, help="serving processes for the second load run"
    )
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks/out/catalogs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/out/service.json")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.serve else logging.INFO)
    if args.serve:
        serve(args.serve, args.port, args.workers)
        return
    sizes = [int(s) for s in args.items.split(",") if s.strip()]
    results = [run_size(items, args) for items in sizes]
    print_table(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load": _loadavg(),
        },
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("serve", "port")},
        "results": [asdict(r) for r in results],
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
