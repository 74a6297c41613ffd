"""Soak: a bounded mixed load (search, feed, feedback) on loopback against `lookalike serve`.

The server is the real command line in a subprocess, over the demo catalog (the sample dump of
`lookalike demo`, offline profile; built once and cached under ``benchmarks/out/``) or over
``--catalog``. Rate limiting is off: every request comes from one loopback address. In the same
run:

* the most requests/s the service carries for this mix (a closed loop of ``--users`` clients);
* the baseline: ``/healthz`` under the same open loop as the soak (what the framework costs);
* the soak: Poisson arrivals at ``--rate`` for ``--duration`` seconds, latency counted from the
  scheduled send time (queueing included). Each virtual user scrolls like the web page: a search
  (by an indexed image, an uploaded image or a text), then feed pages, dwell feedback for what it
  was shown; now and then it starts over, deleting its old session. Every second the server's
  resident memory (``/proc``) and live sessions (``/metrics``) are sampled.

Pass: no error (every answer 2xx), resident memory after the warm-up within +-10 % of its
level when the warm-up ends, live sessions bounded. Without ``--rate`` the rate is the service
target, 200 requests/s, or 70 % of the measured maximum when that is lower (said in the output).

    python benchmarks/soak.py --duration 60 --json OUT.json

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))  # before benchmarks/, whose service.py would shadow service/

from benchmarks.service import Connection, free_port, wait_ready  # noqa: E402

log = logging.getLogger("benchmarks.soak")

TARGET_RATE = 200.0
MIX = {"search": 0.15, "feed": 0.50, "feedback": 0.35}
TEXTS = ("a red circle", "blue star on a night sky", "striped hexagon", "soft pink heart")


# =========================================================================== catalog and server


def demo_catalog(cache: Path, count: int, seed: int) -> Path:
    """The catalog `lookalike demo` builds (sample dump, offline profile), cached."""
    from indexer.build import open_for_indexing
    from indexer.pipeline import PipelineConfig, index_dump
    from indexer.sample_dump import write_sample_dump

    root = cache / f"soak-demo-{count}-seed{seed}"
    done = root / "COMPLETE"
    if done.exists():
        return root / "catalog"
    if root.exists():
        shutil.rmtree(root)
    write_sample_dump(root / "dump", count=count, seed=seed)
    catalog, encoders = open_for_indexing(
        root / "catalog", profile="offline", overrides={}, device="cpu", dtype="fp32"
    )
    with catalog:
        index_dump(root / "dump", catalog, encoders, PipelineConfig(progress=False))
    done.write_text("")
    return root / "catalog"


def start_server(catalog: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).with_name("lookalike")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    command += ["serve", "--catalog", str(catalog), "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, LOOKALIKE_RATE_LIMIT_PER_S="0", HF_HUB_OFFLINE="1")
    with open(log_path, "ab") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return wait_ready(server, port, log=log_path)


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def live_sessions(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("lookalike_live_sessions "):
                return int(float(line.split()[1]))
    return -1


# =========================================================================== virtual users


@dataclass
class User:
    """One person scrolling: a session, what was shown last, and a connection of its own."""

    number: int
    rng: np.random.Generator
    conn: Connection | None = None
    session: str | None = None
    stale: str | None = None  # a session to delete before the next search
    shown: list[str] = field(default_factory=list)
    pages: int = 0
    events: int = 0

    def next_action(self) -> str:
        if self.session is None:
            return "search"
        if not self.shown:
            return "feed"
        return str(self.rng.choice(list(MIX), p=list(MIX.values())))


@dataclass
class Workload:
    """What the users search with: indexed image ids and a few uploadable images."""

    image_ids: list[str]
    uploads: list[str]  # base64 JPEG/PNG/WebP bytes of catalog images


async def act(user: User, work: Workload, port: int) -> tuple[str, int]:
    """Perform the user's next request; (kind, HTTP status or 0 for a broken connection)."""
    if user.conn is None:
        user.conn = await Connection.open(port)
    kind = user.next_action()
    method, path, body = "GET", "", b""
    if kind == "search":
        if user.session is not None and user.rng.random() < 0.5:  # start over, afresh
            user.stale, user.session = user.session, None
        if user.stale is not None:  # the old scroll is closed, as the web page does
            try:
                status, _ = await user.conn.request("DELETE", f"/v1/sessions/{user.stale}")
            except (ConnectionError, asyncio.IncompleteReadError):
                user.conn = None
                return kind, 0
            user.stale = None
            if status != 204:
                return kind, status
        choice = user.rng.random()
        if choice < 0.6:
            query: dict[str, Any] = {"image_id": str(user.rng.choice(work.image_ids))}
        elif choice < 0.85:
            query = {"image_b64": str(user.rng.choice(work.uploads))}
        else:
            query = {"text": str(user.rng.choice(TEXTS))}
        if user.session is not None:
            query["session_id"] = user.session
        method, path, body = "POST", "/v1/search", json.dumps(query).encode()
    elif kind == "feed":
        path = f"/v1/feed?session_id={user.session}"
    else:
        events = [
            {
                "event_id": f"soak-{user.number}-{user.events + i}",
                "image_id": image_id,
                "dwell_ms": float(min(60_000.0, user.rng.lognormal(7.5, 1.0))),
            }
            for i, image_id in enumerate(user.shown)
        ]
        user.events += len(events)
        payload = {"session_id": user.session, "events": events}
        method, path, body = "POST", "/v1/feedback", json.dumps(payload).encode()
    try:
        status, answer = await user.conn.request(method, path, body)
    except (ConnectionError, asyncio.IncompleteReadError):
        user.conn = None
        return kind, 0
    if kind in ("search", "feed") and status == 200:
        page = json.loads(answer)
        user.session = page.get("session_id", user.session)
        user.shown = [item["id"] for item in page["items"]]
        user.pages += 1
        if not user.shown and kind == "feed":  # the scroll ran dry: start over next time
            user.stale = user.session
            user.session = None
    elif kind == "feedback":
        user.shown = []
    return kind, status


def hang_up(users: list[User]) -> None:
    """Close every user's connection (they belong to the event loop of one phase)."""
    for user in users:
        if user.conn is not None:
            user.conn.close()
            user.conn = None


@dataclass
class Phase:
    """One load phase's outcome."""

    name: str
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    by_kind: dict[str, dict[str, float]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)


def _phase(name: str, seconds: float, samples: list[tuple[str, int, float]]) -> Phase:
    latencies = np.array([s[2] for s in samples]) * 1000
    errors = sum(not 200 <= s[1] < 300 for s in samples)
    by_kind = {}
    for kind in sorted({s[0] for s in samples}):
        mine = np.array([s[2] for s in samples if s[0] == kind]) * 1000
        by_kind[kind] = {
            "requests": len(mine),
            "p50_ms": float(np.percentile(mine, 50)),
            "p99_ms": float(np.percentile(mine, 99)),
        }
    return Phase(
        name=name,
        seconds=round(seconds, 2),
        requests=len(samples),
        errors=errors,
        rps=len(samples) / seconds if seconds else 0.0,
        p50_ms=float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        p99_ms=float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
        by_kind=by_kind,
        statuses={str(k): v for k, v in sorted(Counter(s[1] for s in samples).items())},
    )


async def closed_loop(users: list[User], work: Workload, port: int, seconds: float) -> Phase:
    """Every user acts back to back for ``seconds``: the most the service carries."""
    samples: list[tuple[str, int, float]] = []
    deadline = time.perf_counter() + seconds

    async def run(user: User) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            kind, status = await act(user, work, port)
            samples.append((kind, status, time.perf_counter() - started))

    started = time.perf_counter()
    await asyncio.gather(*(run(u) for u in users))
    elapsed = time.perf_counter() - started
    hang_up(users)
    return _phase("closed loop", elapsed, samples)


@dataclass
class Sample:
    t: float
    rss_mb: float
    sessions: int


async def open_loop(
    users: list[User],
    work: Workload,
    port: int,
    rate: float,
    seconds: float,
    seed: int,
    pid: int | None = None,
    health_only: bool = False,
) -> tuple[Phase, list[Sample]]:
    """Poisson arrivals at ``rate``/s; each is served by the next idle user (queueing counts
    in its latency). With ``pid``, the server's memory and sessions are sampled every second."""
    rng = np.random.default_rng([seed, 7])
    arrivals = np.cumsum(rng.exponential(1 / rate, size=int(rate * seconds * 1.5) + 10))
    arrivals = arrivals[arrivals < seconds]
    idle: asyncio.Queue[User] = asyncio.Queue()
    for user in users:
        idle.put_nowait(user)
    samples: list[tuple[str, int, float]] = []
    monitor: list[Sample] = []

    async def one(scheduled: float) -> None:
        user = await idle.get()
        try:
            if health_only:
                if user.conn is None:
                    user.conn = await Connection.open(port)
                status, _ = await user.conn.request("GET", "/healthz")
                kind = "healthz"
            else:
                kind, status = await act(user, work, port)
        finally:
            idle.put_nowait(user)
        samples.append((kind, status, time.perf_counter() - scheduled))

    async def watch() -> None:
        assert pid is not None
        while True:
            sessions = await asyncio.to_thread(live_sessions, port)
            monitor.append(Sample(time.perf_counter() - t0, resident_mb(pid), sessions))
            await asyncio.sleep(1.0)

    t0 = time.perf_counter()
    watcher = asyncio.create_task(watch()) if pid is not None else None
    tasks: dict[asyncio.Task[None], float] = {}
    for at in arrivals:
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks[asyncio.create_task(one(t0 + float(at)))] = t0 + float(at)
    _, unfinished = await asyncio.wait(tasks, timeout=max(30.0, seconds))
    now = time.perf_counter()
    for task in unfinished:  # still queued after as long again: counted as failed
        task.cancel()
        samples.append(("unfinished", 0, now - tasks[task]))
    await asyncio.gather(*unfinished, return_exceptions=True)
    if watcher is not None:
        watcher.cancel()
    hang_up(users)
    name = "healthz" if health_only else "soak"
    return _phase(name, min(now - t0, seconds + 1e-9), samples), monitor


# =========================================================================== main


@dataclass
class SoakReport:
    catalog: str
    items: int
    users: int
    duration_s: float
    rate: float
    rate_note: str
    max_throughput: Phase
    healthz_baseline: Phase
    soak: Phase
    error_rate: float
    warmup_s: float
    rss_at_warmup_mb: float
    rss_min_after_mb: float
    rss_max_after_mb: float
    rss_drift_pct: tuple[float, float]
    sessions_max: int
    sessions_final: int
    memory: list[Sample]
    passed: bool
    machine: dict[str, Any]


def workload(catalog: Path, uploads: int, seed: int) -> Workload:
    from indexer.catalog import Catalog

    with Catalog.open(catalog) as cat:
        items = list(cat.iter_items())
    rng = np.random.default_rng([seed, 11])
    picked = rng.choice(len(items), size=min(uploads, len(items)), replace=False)
    encoded = [base64.b64encode(Path(items[int(i)].file).read_bytes()).decode() for i in picked]
    return Workload([item.id for item in items], encoded)


def run(args: argparse.Namespace) -> SoakReport:
    catalog = args.catalog or demo_catalog(args.cache, args.count, args.seed)
    work = workload(catalog, uploads=16, seed=args.seed)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(catalog, port, Path(tmp) / "server.log")
        try:
            return measure(args, catalog, work, port, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)


def measure(
    args: argparse.Namespace, catalog: Path, work: Workload, port: int, pid: int
) -> SoakReport:
    rng = np.random.default_rng([args.seed, 9])
    # The same people throughout, each holding one session at most (connections are per run).
    people = [User(n, np.random.default_rng(rng.integers(2**32))) for n in range(args.users)]

    def users() -> list[User]:
        return people

    asyncio.run(closed_loop(users(), work, port, 3.0))  # warm the server's caches
    saturated = asyncio.run(closed_loop(users(), work, port, args.probe))
    if args.rate:
        rate, note = args.rate, "as asked"
    elif 0.7 * saturated.rps < TARGET_RATE:
        rate = round(0.7 * saturated.rps, 1)
        note = (
            f"70 % of the {saturated.rps:.0f} requests/s this catalog carried here "
            f"(the {TARGET_RATE:.0f}/s target is more than this machine serves)"
        )
    else:
        rate, note = TARGET_RATE, "the service target"
    log.info("soak at %.1f requests/s (%s)", rate, note)
    health, _ = asyncio.run(
        open_loop(users(), work, port, rate, min(10.0, args.duration), args.seed, health_only=True)
    )
    soak, memory = asyncio.run(
        open_loop(users(), work, port, rate, args.duration, args.seed, pid=pid)
    )
    warmup = args.warmup
    after = [s for s in memory if s.t >= warmup]
    reference = float(np.median([s.rss_mb for s in after[:3]])) if after else float("nan")
    low = min((s.rss_mb for s in after), default=float("nan"))
    high = max((s.rss_mb for s in after), default=float("nan"))
    drift = (100 * (low - reference) / reference, 100 * (high - reference) / reference)
    sessions = [s.sessions for s in memory]
    error_rate = soak.errors / soak.requests if soak.requests else 1.0
    passed = soak.errors == 0 and max(abs(d) for d in drift) <= 10.0
    passed = passed and max(sessions, default=0) <= args.users
    from indexer.catalog import Catalog

    with Catalog.open(catalog) as cat:
        items = len(cat)
    return SoakReport(
        catalog=str(catalog),
        items=items,
        users=args.users,
        duration_s=args.duration,
        rate=rate,
        rate_note=note,
        max_throughput=saturated,
        healthz_baseline=health,
        soak=soak,
        error_rate=error_rate,
        warmup_s=warmup,
        rss_at_warmup_mb=round(reference, 1),
        rss_min_after_mb=round(low, 1),
        rss_max_after_mb=round(high, 1),
        rss_drift_pct=(round(drift[0], 2), round(drift[1], 2)),
        sessions_max=max(sessions, default=0),
        sessions_final=sessions[-1] if sessions else 0,
        memory=memory,
        passed=passed,
        machine={
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
        },
    )


def print_report(report: SoakReport) -> None:
    print(
        f"catalog {report.catalog} ({report.items} items), {report.users} users, "
        f"{report.duration_s:.0f} s at {report.rate:g} requests/s ({report.rate_note})"
    )
    header = f"{'phase':<12} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}"
    print(header)
    print("-" * len(header))
    for phase in (report.max_throughput, report.healthz_baseline, report.soak):
        print(
            f"{phase.name:<12} {phase.requests:>8} {phase.errors:>6} {phase.rps:>7.1f} "
            f"{phase.p50_ms:>8.1f} {phase.p99_ms:>8.1f}"
        )
    for kind, row in report.soak.by_kind.items():
        print(
            f"  {kind:<10} {row['requests']:>8.0f} {'':>6} {'':>7} {row['p50_ms']:>8.1f} "
            f"{row['p99_ms']:>8.1f}"
        )
    print(
        f"error rate {report.error_rate:.4f}; resident memory after {report.warmup_s:.0f} s "
        f"warm-up {report.rss_at_warmup_mb} MB, then {report.rss_min_after_mb}-"
        f"{report.rss_max_after_mb} MB ({report.rss_drift_pct[0]:+.1f} % / "
        f"{report.rss_drift_pct[1]:+.1f} %); live sessions max {report.sessions_max}, "
        f"final {report.sessions_final}; load average {report.machine['load_average'][0]:.1f}"
    )
    print("PASS" if report.passed else "FAIL")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of soak")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before memory counts")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default: see above)")
    parser.add_argument("--users", type=int, default=32, help="virtual users")
    parser.add_argument("--probe", type=float, default=10.0, help="seconds of the closed loop")
    parser.add_argument("--catalog", type=Path, default=None)
    parser.add_argument("--count", type=int, default=500, help="images of the demo dump")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks/out")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2))
    if not report.passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
