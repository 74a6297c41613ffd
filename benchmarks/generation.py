"""Generation benchmark: does generation keep feeds waiting, and how soon do new images arrive?

On a sample-dump catalog (offline profile, real encoders), in one run:

* **Feed latency with and without generation.** The real app in a subprocess (rate limit
  off) serves the same catalog twice, first with ``--generator none`` (the baseline), then
  with ``--generator sample``. ``--sessions`` fresh sessions are scrolled by an open loop at
  ``--rate`` feed requests/s (Poisson arrivals, latency from the scheduled send time); that
  is what is measured. Meanwhile, in both phases, 8 sessions already scrolled dry ask for a
  page 10 times a second (not measured): with the sample generator their sparse pages keep
  generation running for the whole phase, and the report says how many images it made. So
  the two phases differ only in whether generation runs. Target: p99 with generation ≤ 1.5×
  p99 without.
* **Sparse signal to new items.** In process, for ``--trials`` sessions: the time from the
  sparse page that queued a job to the first later page that shows the new images (the
  session asks again every 10 ms). Target: under 2 s.

    python benchmarks/generation.py                 # defaults: 2,000 images, 20 s phases
    python benchmarks/generation.py --duration 5    # quick

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.service import (  # noqa: E402
    Connection,
    LoadResult,
    free_port,
    open_loop,
    wait_ready,
)
from indexer.build import open_for_indexing  # noqa: E402
from indexer.pipeline import PipelineConfig, index_dump  # noqa: E402
from indexer.sample_dump import write_sample_dump  # noqa: E402

log = logging.getLogger("benchmarks.generation")


def build_catalog(root: Path, count: int, seed: int) -> Path:
    """A sample dump and its offline-profile catalog under ``root`` (cached)."""
    catalog_dir = root / f"catalog-{count}-{seed}"
    if (catalog_dir / "manifest.json").exists():
        return catalog_dir
    write_sample_dump(root / f"dump-{count}-{seed}", count=count, seed=seed)
    catalog, encoders = open_for_indexing(
        catalog_dir, profile="offline", overrides={}, device="cpu", dtype="fp32"
    )
    with catalog:
        index_dump(root / f"dump-{count}-{seed}", catalog, encoders, PipelineConfig())
    return catalog_dir


# --------------------------------------------------------------------------- feed latency


def start_server(catalog: Path, port: int, generator: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LOOKALIKE_CATALOG": str(catalog),
        "LOOKALIKE_RATE_LIMIT_PER_S": "0",
        "LOOKALIKE_GENERATOR": generator,
        "LOOKALIKE_GENERATOR_INTERVAL_S": "1",
        "LOOKALIKE_LOG_JSON": "false",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, __file__, "--serve", "--port", str(port)]
    return wait_ready(subprocess.Popen(command, cwd=REPO, env=env), port, timeout=120)


def serve(port: int) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    uvicorn.run(create_app(Settings()), host="127.0.0.1", port=port, log_level="warning")


async def new_sessions(port: int, count: int, ids: list[str], seed: int, dry: bool) -> list[str]:
    """``count`` sessions from random images; ``dry``: each scrolled until a page is sparse."""
    rng = np.random.default_rng(seed)
    conn = await Connection.open(port)
    sessions = []
    for _ in range(count):
        body = json.dumps({"image_id": ids[int(rng.integers(len(ids)))]}).encode()
        status, answer = await conn.request("POST", "/v1/search", body)
        assert status == 200, answer[:200]
        page = json.loads(answer)
        session = page["session_id"]
        for _ in range(200 if dry else 0):
            if page["sparse"]:
                break
            status, answer = await conn.request("GET", f"/v1/feed?session_id={session}")
            page = json.loads(answer)
        sessions.append(session)
    conn.close()
    return sessions


async def keep_asking(port: int, sessions: list[str], rate: float, seconds: float) -> None:
    """Scroll the dry sessions at ``rate`` pages/s (not measured): with a generator, their
    sparse pages keep generation running for the whole phase."""
    conn = await Connection.open(port)
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        await conn.request("GET", f"/v1/feed?session_id={sessions[n % len(sessions)]}")
        n += 1
        await asyncio.sleep(1 / rate)
    conn.close()


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


@dataclass
class Phase:
    generator: str
    load: LoadResult
    images_generated: float


def run_phase(catalog: Path, generator: str, ids: list[str], args: argparse.Namespace) -> Phase:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "catalog"
        shutil.copytree(catalog, copy)
        port = free_port()
        server = start_server(copy, port, generator)
        try:
            sessions = asyncio.run(new_sessions(port, args.sessions, ids, args.seed, dry=False))
            dry = asyncio.run(new_sessions(port, 8, ids, args.seed + 1, dry=True))
            before = scrape(port, "lookalike_generated_images_total")
            paths = [f"/v1/feed?session_id={s}" for s in sessions]
            load = asyncio.run(measure(port, paths, dry, args))
            made = scrape(port, "lookalike_generated_images_total") - before
        finally:
            server.terminate()
            server.wait(30)
    return Phase(generator, load, made)


async def measure(
    port: int, paths: list[str], dry: list[str], args: argparse.Namespace
) -> LoadResult:
    load, _ = await asyncio.gather(
        open_loop(port, paths, args.rate, args.duration, args.seed),
        keep_asking(port, dry, 10.0, args.duration),
    )
    return load


# --------------------------------------------------------------------------- time to new items


def time_to_new_items(catalog: Path, ids: list[str], trials: int, seed: int) -> list[float]:
    """Seconds from the sparse page that queued a job to the page showing its images."""
    from recommender.api import ItemQuery
    from recommender.engine import Engine
    from recommender.generate import GenerationConfig, make_generator

    config = GenerationConfig(width=256, height=256, session_interval_s=0.0)
    rng = np.random.default_rng(seed)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "catalog"
        shutil.copytree(catalog, copy)
        generator = make_generator("sample", config)
        assert generator is not None
        engine = Engine.from_catalog(copy, generator=generator)
        engine.load()
        generator.start(engine)
        generator.wait_ready()  # the worker process has loaded its encoders
        try:
            for _ in range(trials):
                page = engine.search(ItemQuery(ids[int(rng.integers(len(ids)))]))
                while not page.generating:
                    page = engine.feed(page.session_id)
                asked = time.perf_counter()
                while not any(item.generated for item in page.items):
                    time.sleep(0.01)
                    page = engine.feed(page.session_id)
                out.append(time.perf_counter() - asked)
        finally:
            engine.close()
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=2000, help="sample dump size")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load phase")
    parser.add_argument("--rate", type=float, default=40.0, help="feed requests/s")
    parser.add_argument("--sessions", type=int, default=48, help="scrolling sessions")
    parser.add_argument("--trials", type=int, default=20, help="sessions timed to new items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks/out/generation")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/out/generation.json")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.serve:
        serve(args.port)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    catalog = build_catalog(args.cache, args.images, args.seed)
    from indexer.catalog import Catalog

    with Catalog.open(catalog) as opened:
        ids = [item.id for item in opened.iter_items()]
    phases = [run_phase(catalog, generator, ids, args) for generator in ("none", "sample")]
    waits = time_to_new_items(catalog, ids, args.trials, args.seed)
    base, gen = phases
    ratio = gen.load.p99_ms / base.load.p99_ms
    print(f"\n/v1/feed at {args.rate:g} req/s over {args.sessions} sessions, {args.images} items")
    print("| generator | requests | errors | p50 ms | p99 ms | images generated |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase in phases:
        load = phase.load
        print(
            f"| {phase.generator} | {load.requests} | {load.errors} | {load.p50_ms:.1f} "
            f"| {load.p99_ms:.1f} | {phase.images_generated:.0f} |"
        )
    print(f"p99 with generation / without: {ratio:.2f}× (target ≤ 1.5×)")
    print(
        f"sparse signal -> new items in the feed: mean {np.mean(waits):.2f} s, "
        f"p95 {np.percentile(waits, 95):.2f} s, max {max(waits):.2f} s over {len(waits)} "
        "sessions (target < 2 s)"
    )
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("serve", "port")},
        "phases": [asdict(p) for p in phases],
        "p99_ratio": ratio,
        "time_to_new_items_s": waits,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
