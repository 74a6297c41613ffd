"""Crash trials: SIGKILL `lookalike index` at random moments and at named points of the catalog's
writes, resume it, and check the catalog after every kill and at the end.

Every run is the real command line (``lookalike index DUMP --catalog CAT``, through
``service.cli.main``) in a child process. The child adds only what a trial needs: a hook that
SIGKILLs the process itself at the n-th occurrence of a named point (below), a ``READY`` line when
indexing starts, a short checkpoint interval (many FAISS and manifest writes per run) and, with
``--encoders fake``, the weight-free test encoders slowed to a fixed time per batch.

A trial starts from an empty catalog directory, kills one run at its crash point, kills the
resumed run again after a random delay (``--kills-per-trial``), then lets a last run finish.
After every kill the catalog (a copy of it, so the next run resumes from the raw crashed state)
must open, hold as many vectors in every FAISS index as rows in SQLite, the same keys and the
same vectors, no id twice and no dangling duplicate alias. After the last run, items, duplicate
aliases, skipped files and vectors must equal those of an uninterrupted run of the same dump.

    python benchmarks/crash_trials.py --trials 24 --json OUT.json
    python benchmarks/crash_trials.py --trials 20 --encoders offline --count 300 --json OUT.json

Prints a table and writes JSON (``--json``). ``tests/test_reliability_crash.py`` runs a few
trials of the same harness in the default test run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))  # before benchmarks/, whose service.py would shadow service/

log = logging.getLogger("benchmarks.crash_trials")

READY = "CRASH-TRIAL-READY"

CRASH_POINTS: dict[str, str] = {
    "sqlite-transaction": "inside a batch's SQLite transaction, before it commits",
    "after-commit": "a batch committed to SQLite, the FAISS snapshots not yet written",
    "faiss-partial": "a FAISS snapshot half written to its temporary file",
    "faiss-before-rename": "a FAISS snapshot written and fsynced, not yet renamed into place",
    "faiss-after-rename": "a FAISS snapshot renamed into place, the manifest not yet written",
    "manifest-partial": "the manifest half written to its temporary file",
    "manifest-before-rename": "the manifest written and fsynced, not yet renamed into place",
    "random": "a SIGKILL from outside, after a random delay once indexing started",
}


@dataclass(frozen=True)
class Crash:
    """Where a run dies: the ``at``-th occurrence of ``point``, or, for ``random``, after
    ``at`` times the reference run's indexing time."""

    point: str
    at: float

    def __str__(self) -> str:
        return (
            f"{self.point}@{self.at:.2f}" if self.point == "random" else f"{self.point}#{self.at:g}"
        )


@dataclass(frozen=True)
class Harness:
    """How the child runs: encoders, and for the fake ones their pace and checkpoint interval."""

    encoders: str = "fake"  # "fake" (tests/fakes.py) or "offline" (the real offline profile)
    batch_size: int = 4
    batch_delay_s: float = 0.04
    checkpoint_s: float = 0.15
    timeout_s: float = 300.0


# =========================================================================== the child


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _crashing_write(real: Callable[..., None], stage: str, hit: Callable[[], bool]) -> Any:
    """Wrap ``indexer.storage.atomic_write`` so that its chosen call dies at ``stage``."""

    def write_with_crash(path: Path, write: Callable[[Path], object]) -> None:
        if not hit():
            real(path, write)
            return
        if stage == "partial":

            def half(tmp: Path) -> None:
                write(tmp)
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                _die()

            real(path, half)
        elif stage == "before-rename":

            def whole(tmp: Path) -> None:
                write(tmp)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                _die()

            real(path, whole)
        else:  # after-rename
            real(path, write)
            _die()

    return write_with_crash


def install_hooks(point: str | None, occurrence: int, harness: Harness) -> None:
    """Patch this (child) process: the crash point, the READY line, the fake encoders."""
    import indexer.build
    import indexer.catalog
    import indexer.pipeline
    import indexer.storage
    import indexer.vector_index

    counter = itertools.count(1)

    def hit() -> bool:
        return next(counter) == occurrence

    if point is not None and point.startswith("faiss-"):
        real = indexer.vector_index.atomic_write
        stage = point.removeprefix("faiss-")
        indexer.vector_index.atomic_write = _crashing_write(real, stage, hit)  # type: ignore[assignment]
    elif point is not None and point.startswith("manifest-"):
        # Only the manifest goes through storage.atomic_write_bytes -> storage.atomic_write.
        real = indexer.storage.atomic_write
        stage = point.removeprefix("manifest-")
        indexer.storage.atomic_write = _crashing_write(real, stage, hit)  # type: ignore[assignment]
    elif point == "sqlite-transaction":
        bump = indexer.catalog.Catalog._bump_generation

        def bump_then_die(self: Any) -> None:
            bump(self)
            if hit():
                _die()

        indexer.catalog.Catalog._bump_generation = bump_then_die  # type: ignore[method-assign]
    elif point == "after-commit":
        add = indexer.catalog.Catalog.add

        def add_then_die(self: Any, *args: Any, **kwargs: Any) -> Any:
            keys = add(self, *args, **kwargs)
            if hit():
                _die()
            return keys

        indexer.catalog.Catalog.add = add_then_die  # type: ignore[method-assign]

    index_dump = indexer.pipeline.index_dump

    def announced(*args: Any, **kwargs: Any) -> Any:
        print(READY, flush=True)
        return index_dump(*args, **kwargs)

    indexer.pipeline.index_dump = announced  # type: ignore[assignment]
    indexer.pipeline.PipelineConfig = partial(  # type: ignore[misc,assignment]
        indexer.pipeline.PipelineConfig, checkpoint_seconds=harness.checkpoint_s
    )
    if harness.encoders == "fake":
        from tests.fakes import fake_encoders, specs

        def paced_encoders(*args: Any, **kwargs: Any) -> dict[str, Any]:
            encoders = fake_encoders()
            visual = encoders["visual"]
            embed = visual.embed_batch

            def paced(items: Any) -> Any:
                time.sleep(harness.batch_delay_s)
                return embed(items)

            visual.embed_batch = paced  # type: ignore[method-assign]
            return encoders

        indexer.build.choose_specs = lambda *args, **kwargs: specs()  # type: ignore[assignment]
        indexer.build.create_encoders = paced_encoders  # type: ignore[assignment]


def child_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="crash_trials.py child")
    parser.add_argument("--crash", default="")
    parser.add_argument("--harness", required=True, help="the Harness as JSON")
    parser.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    harness = Harness(**json.loads(args.harness))
    point, _, occurrence = args.crash.partition("#")
    install_hooks(point or None, int(occurrence or 0), harness)
    from service.cli import main

    sys.argv = ["lookalike", *[a for a in args.cli if a != "--"]]
    main()


# =========================================================================== the parent


def child_command(dump: Path, catalog: Path, crash: Crash | None, harness: Harness) -> list[str]:
    hook = f"{crash.point}#{int(crash.at)}" if crash and crash.point != "random" else ""
    cli = ["index", str(dump), "--catalog", str(catalog), "--no-progress"]
    cli += ["--batch-size", str(harness.batch_size)]
    if harness.encoders == "offline":
        cli += ["--profile", "offline"]
    harness_json = json.dumps(asdict(harness))
    module = ["-m", "benchmarks.crash_trials", "child"]
    return [sys.executable, *module, "--crash", hook, "--harness", harness_json, "--", *cli]


@dataclass
class RunResult:
    """One child run: how it ended and how long it ran after READY."""

    crash: str
    killed: bool
    returncode: int
    indexing_s: float
    stderr_tail: str = ""


def run_child(
    dump: Path, catalog: Path, crash: Crash | None, harness: Harness, reference_s: float
) -> RunResult:
    """Run `lookalike index` once; kill it at ``crash`` (a hook, or a delay for ``random``)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            child_command(dump, catalog, crash, harness),
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=REPO,
            text=True,
        )
        assert child.stdout is not None
        ready_at = _wait_for_ready(child, harness.timeout_s)
        if crash is not None and crash.point == "random" and ready_at is not None:
            delay = crash.at * reference_s - (time.monotonic() - ready_at)
            try:
                child.wait(timeout=max(0.0, delay))
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
        try:
            child.wait(timeout=harness.timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise RuntimeError(f"`lookalike index` hung for {harness.timeout_s} s") from None
        child.stdout.read()
        child.stdout.close()
        elapsed = time.monotonic() - ready_at if ready_at is not None else 0.0
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace")[-3000:]
    killed = child.returncode == -signal.SIGKILL
    return RunResult(str(crash) if crash else "", killed, child.returncode, elapsed, tail)


def _wait_for_ready(child: subprocess.Popen[str], timeout_s: float) -> float | None:
    """Read the child's stdout until its READY line; the time it came, or None if it exited."""
    found: list[float] = []

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == READY:
                found.append(time.monotonic())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return found[0] if found else None


# --------------------------------------------------------------------------- checks


@dataclass
class CatalogState:
    """What a catalog held when checked; ``problems`` lists broken invariants."""

    exists: bool
    items: int = 0
    vectors: dict[str, int] = field(default_factory=dict)
    leftover_tmp: int = 0
    problems: list[str] = field(default_factory=list)


def leftover_temp_files(catalog: Path) -> int:
    """Temporary files an interrupted atomic write left behind (``.NAME.XXXX.tmp``)."""
    if not catalog.exists():
        return 0
    return sum(1 for p in catalog.rglob(".*.tmp") if p.is_file())


def check_catalog(catalog: Path, scratch: Path) -> CatalogState:
    """Open a copy of ``catalog`` (opening may repair; the original stays as crashed) and check
    it: it opens; every space's FAISS index has exactly SQLite's keys, once each, with SQLite's
    vectors; ids are unique; duplicate aliases point at stored items."""
    from indexer.catalog import MANIFEST, Catalog

    leftovers = leftover_temp_files(catalog)
    if not (catalog / MANIFEST).exists():
        return CatalogState(exists=False, leftover_tmp=leftovers)
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(catalog, scratch)
    state = CatalogState(exists=True, leftover_tmp=leftovers)
    try:
        opened = Catalog.open(scratch)
    except Exception as exc:  # noqa: BLE001 - a catalog that does not open is the finding
        state.problems.append(f"does not open: {type(exc).__name__}: {exc}")
        return state
    with opened as cat:
        state.items = len(cat)
        rows = _sql(scratch, "SELECT key, id FROM items")
        keys = np.array(sorted(k for k, _ in rows), dtype=np.int64)
        ids = [i for _, i in rows]
        if len(ids) != len(set(ids)):
            state.problems.append("an id is stored twice")
        aliased = _sql(scratch, "SELECT d.id FROM duplicates d JOIN items i ON i.id = d.id")
        dangling = _sql(
            scratch, "SELECT id FROM duplicates WHERE of_key NOT IN (SELECT key FROM items)"
        )
        if aliased or dangling:
            state.problems.append(f"bad duplicate aliases: {aliased[:3]} {dangling[:3]}")
        for space, index in cat.indexes.items():
            state.vectors[space] = len(index)
            blobs = dict(_sql(scratch, "SELECT key, vec FROM vectors WHERE space = ?", (space,)))
            if len(index) != len(keys) or len(blobs) != len(keys):
                state.problems.append(
                    f"{space}: FAISS {len(index)}, SQLite items {len(keys)}, vectors {len(blobs)}"
                )
                continue
            if not len(keys):
                continue
            stored = np.stack([np.frombuffer(blobs[int(k)], dtype=np.float32) for k in keys])
            _, found = cat.search(space, stored[:1], k=len(keys))
            faiss_keys = found[0][found[0] >= 0]
            if len(faiss_keys) != len(set(faiss_keys.tolist())):
                state.problems.append(f"{space}: a key is in the FAISS index twice")
            if set(faiss_keys.tolist()) != set(keys.tolist()):
                state.problems.append(f"{space}: FAISS keys differ from SQLite's")
            elif not np.allclose(cat.vectors(space, keys), stored, atol=1e-6):
                state.problems.append(f"{space}: FAISS vectors differ from SQLite's")
    return state


def _sql(db_dir: Path, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_dir / "catalog.sqlite") as conn:
        return list(conn.execute(query, params))


@dataclass(frozen=True)
class Contents:
    """What a finished catalog holds, by id (keys differ between runs)."""

    items: dict[str, str]
    duplicates: dict[str, str]
    skipped: dict[str, str]
    vectors: dict[str, dict[str, np.ndarray]]


def contents(catalog: Path, dump: Path | None = None) -> Contents:
    """What ``catalog`` holds; skipped files relative to ``dump`` when given (so that catalogs
    of two copies of a dump compare equal)."""
    from indexer.catalog import Catalog

    with Catalog.open(catalog) as cat:
        by_key = {item.key: item for item in cat.iter_items()}
        vectors = {
            space: dict(
                zip(
                    [item.id for item in by_key.values()],
                    cat.vectors(space, list(by_key)),
                    strict=True,
                )
            )
            for space in cat.spaces
        }
    duplicates = _sql(
        catalog, "SELECT d.id, i.id FROM duplicates d JOIN items i ON i.key = d.of_key"
    )
    return Contents(
        items={item.id: item.content_hash for item in by_key.values()},
        duplicates=dict(duplicates),
        skipped={
            os.path.relpath(file, dump) if dump else file: reason
            for file, reason in _sql(catalog, "SELECT file, reason FROM skipped")
        },
        vectors=vectors,
    )


def differences(got: Contents, want: Contents, atol: float) -> list[str]:
    """How a resumed catalog differs from the uninterrupted one (empty when equal)."""
    found = []
    for name in ("items", "duplicates", "skipped"):
        a, b = getattr(got, name), getattr(want, name)
        if a != b:
            missing, extra = sorted(set(b) - set(a))[:5], sorted(set(a) - set(b))[:5]
            found.append(f"{name} differ: missing {missing}, extra {extra}")
    for space, want_vectors in want.vectors.items():
        got_vectors = got.vectors.get(space, {})
        for item_id, vector in want_vectors.items():
            if item_id in got_vectors and not np.allclose(got_vectors[item_id], vector, atol=atol):
                found.append(f"{space} vector of {item_id} differs")
                break
    return found


# --------------------------------------------------------------------------- trials


@dataclass
class TrialResult:
    trial: int
    runs: list[RunResult]
    states: list[CatalogState]  # after each killed run
    final_differences: list[str]
    final_state: CatalogState | None = None

    @property
    def failures(self) -> list[str]:
        out = [f"after kill {i + 1}: {p}" for i, s in enumerate(self.states) for p in s.problems]
        out += [
            f"run {i + 1} ({r.crash or 'resume'}) failed with exit {r.returncode}: "
            + r.stderr_tail[-600:]
            for i, r in enumerate(self.runs)
            if not r.killed and r.returncode != 0
        ]
        if self.final_state is not None:
            out += [f"final: {p}" for p in self.final_state.problems]
        return out + [f"final: {d}" for d in self.final_differences]


def reference_run(dump: Path, work: Path, harness: Harness) -> tuple[Contents, float]:
    """An uninterrupted run of the same command: what every trial must end up with."""
    target = work / "reference"
    if target.exists():
        shutil.rmtree(target)
    result = run_child(dump, target, None, harness, 0.0)
    if result.returncode != 0:
        raise RuntimeError(f"the reference run failed: {result.stderr_tail}")
    return contents(target), result.indexing_s


def run_trial(
    number: int,
    crashes: Sequence[Crash],
    dump: Path,
    work: Path,
    harness: Harness,
    reference: Contents,
    reference_s: float,
) -> TrialResult:
    catalog, scratch = work / f"trial-{number}", work / "scratch"
    if catalog.exists():
        shutil.rmtree(catalog)
    result = TrialResult(number, [], [], [])
    for crash in crashes:
        run = run_child(dump, catalog, crash, harness, reference_s)
        result.runs.append(run)
        if run.killed:
            result.states.append(check_catalog(catalog, scratch))
        elif run.returncode != 0:
            return result
    final = run_child(dump, catalog, None, harness, reference_s)
    result.runs.append(final)
    if final.returncode == 0:
        result.final_state = check_catalog(catalog, scratch)
        atol = 1e-6 if harness.encoders == "fake" else 1e-4  # batch makeup moves MiniLM a hair
        result.final_differences = differences(contents(catalog), reference, atol)
    shutil.rmtree(catalog)
    return result


def default_schedule(
    trials: int, kills_per_trial: int, seed: int, max_occurrence: dict[str, int] | None = None
) -> list[list[Crash]]:
    """Trial i dies first at point i (cycling through CRASH_POINTS, occurrence drawn at random),
    then ``kills_per_trial - 1`` more times after random delays."""
    rng = np.random.default_rng(seed)
    limits = {"faiss-": 6, "manifest-": 3, "sqlite-": 6, "after-": 6} | (max_occurrence or {})
    points = list(CRASH_POINTS)
    schedule = []
    for i in range(trials):
        point = points[i % len(points)]
        if point == "random":
            first = Crash(point, float(rng.uniform(0.05, 0.95)))
        else:
            limit = next(v for k, v in limits.items() if point.startswith(k))
            first = Crash(point, float(rng.integers(1, limit + 1)))
        more = [Crash("random", float(rng.uniform(0.05, 0.9))) for _ in range(kills_per_trial - 1)]
        schedule.append([first, *more])
    return schedule


@dataclass
class Summary:
    trials: int
    runs: int
    kills: int
    kills_by_point: dict[str, int]
    points_not_reached: int
    failures: list[str]
    leftover_tmp_max: int
    elapsed_s: float
    harness: dict[str, Any]
    dump: str
    machine: str


def summarise(results: list[TrialResult], harness: Harness, dump: Path, elapsed: float) -> Summary:
    kills: Counter[str] = Counter()
    not_reached = 0
    for trial in results:
        for run in trial.runs[:-1]:
            point = run.crash.split("#")[0].split("@")[0]
            if run.killed:
                kills[point] += 1
            else:
                not_reached += 1
    leftovers = [s.leftover_tmp for t in results for s in t.states]
    return Summary(
        trials=len(results),
        runs=sum(len(t.runs) for t in results),
        kills=sum(kills.values()),
        kills_by_point=dict(sorted(kills.items())),
        points_not_reached=not_reached,
        failures=[f"trial {t.trial}: {f}" for t in results for f in t.failures],
        leftover_tmp_max=max(leftovers, default=0),
        elapsed_s=round(elapsed, 1),
        harness=asdict(harness),
        dump=str(dump),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    )


def iter_trials(
    schedule: list[list[Crash]], dump: Path, work: Path, harness: Harness
) -> Iterator[TrialResult]:
    reference, reference_s = reference_run(dump, work, harness)
    log.info("reference run: %d items, %.2f s of indexing", len(reference.items), reference_s)
    for number, crashes in enumerate(schedule, start=1):
        result = run_trial(number, crashes, dump, work, harness, reference, reference_s)
        log.info(
            "trial %d: %s -> %s",
            number,
            ", ".join(f"{r.crash or 'resume'}{' KILLED' if r.killed else ''}" for r in result.runs),
            "ok" if not result.failures else f"{len(result.failures)} failures",
        )
        yield result


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        child_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--kills-per-trial", type=int, default=2)
    parser.add_argument("--encoders", choices=("fake", "offline"), default="fake")
    parser.add_argument("--count", type=int, default=80, help="images in the sample dump")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from indexer.sample_dump import write_sample_dump

    harness = Harness(encoders=args.encoders, batch_size=4 if args.encoders == "fake" else 16)
    if args.encoders == "offline":
        harness = Harness(encoders="offline", batch_size=16, checkpoint_s=1.0)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        dump = work / "dump"
        write_sample_dump(dump, count=args.count, seed=args.seed)
        schedule = default_schedule(args.trials, args.kills_per_trial, args.seed)
        started = time.monotonic()
        results = list(iter_trials(schedule, dump, work, harness))
        summary = summarise(results, harness, dump, time.monotonic() - started)
    summary.dump = f"sample dump, {args.count} images, seed {args.seed}"
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(asdict(summary), indent=2))


def print_summary(summary: Summary) -> None:
    print(f"{'crash point':<24} {'kills':>5}  what the process was doing")
    for point, what in CRASH_POINTS.items():
        print(f"{point:<24} {summary.kills_by_point.get(point, 0):>5}  {what}")
    print(
        f"\ntrials {summary.trials}, runs {summary.runs}, kills {summary.kills}, "
        f"points not reached {summary.points_not_reached}, failures {len(summary.failures)}, "
        f"most leftover temp files {summary.leftover_tmp_max}, {summary.elapsed_s} s "
        f"({summary.harness['encoders']} encoders; {summary.machine})"
    )
    for failure in summary.failures:
        print("FAILURE", failure)


if __name__ == "__main__":
    main()
