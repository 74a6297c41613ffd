"""Crash safety end to end: `lookalike index` killed at named write points and at random, resumed;
`lookalike serve` killed during a feedback burst; indexing onto a full disk.

The index runs go through benchmarks/crash_trials.py (the real CLI in a child process, killed by
SIGKILL); the default run does one kill at each of five write points, and ``-m slow`` runs 24
two-kill trials over every point. tests/test_pipeline.py has the plain random-kill resume test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from benchmarks.crash_trials import (
    CRASH_POINTS,
    Contents,
    Crash,
    Harness,
    RunResult,
    check_catalog,
    contents,
    default_schedule,
    differences,
    iter_trials,
    leftover_temp_files,
    run_child,
    summarise,
)
from indexer.catalog import Catalog
from indexer.errors import DiskFullError
from indexer.pipeline import PipelineConfig, index_dump
from indexer.sample_dump import write_sample_dump
from indexer.storage import STALE_TEMP_S
from tests.cli_helpers import serving, writable_copy
from tests.fakes import fake_encoders, specs


@pytest.fixture(scope="module")
def crash_dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 images in API pages, with the sample dump's broken files and exact duplicates."""
    root = tmp_path_factory.mktemp("crash") / "dump"
    write_sample_dump(root, count=60, seed=3)
    return root


# =========================================================================== killed indexing

# (point, occurrence): creation's first manifest, then writes in the middle of a run.
NAMED_KILLS = [
    Crash("manifest-partial", 1),
    Crash("sqlite-transaction", 3),
    Crash("after-commit", 2),
    Crash("faiss-partial", 5),
    Crash("manifest-before-rename", 3),
]


def test_kill_at_each_write_point_then_resume(crash_dump: Path, tmp_path: Path) -> None:
    """After every SIGKILL the catalog opens, FAISS holds exactly SQLite's rows, no id twice;
    the resumed run ends with what an uninterrupted run gives."""
    results = list(iter_trials([[kill] for kill in NAMED_KILLS], crash_dump, tmp_path, Harness()))
    summary = summarise(results, Harness(), crash_dump, 0.0)
    assert not summary.failures, "\n".join(summary.failures)
    # Every kill landed where it was aimed (a run that finished first would prove nothing).
    assert [run.killed for trial in results for run in trial.runs[:-1]] == [True] * len(NAMED_KILLS)
    assert results[0].states[0].exists is False  # died writing the very first manifest
    assert all(state.exists and state.items > 0 for t in results[1:] for state in t.states)


@pytest.mark.slow
def test_crash_trials_every_point_many_times(crash_dump: Path, tmp_path: Path) -> None:
    schedule = default_schedule(trials=24, kills_per_trial=2, seed=0)
    results = list(iter_trials(schedule, crash_dump, tmp_path, Harness()))
    summary = summarise(results, Harness(), crash_dump, 0.0)
    assert not summary.failures, "\n".join(summary.failures)
    assert set(summary.kills_by_point) == set(CRASH_POINTS)
    assert summary.kills >= 30


def test_temp_files_of_killed_writes_are_cleared(crash_dump: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    run = run_child(crash_dump, catalog, Crash("faiss-partial", 3), Harness(), 0.0)
    assert run.killed and leftover_temp_files(catalog) == 1
    stale = next(catalog.rglob(".*.tmp"))
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    young = catalog / "faiss" / ".visual.faiss.abc123.tmp"  # a concurrent writer's, say
    young.write_bytes(b"in progress")
    assert run_child(crash_dump, catalog, None, Harness(), 0.0).returncode == 0
    assert not stale.exists() and young.exists()


# ====================================================================== re-indexing moved dumps
# Found by the disk-full trials below: re-indexing a dump whose files were copied or touched
# (new mtime, same bytes) turned its duplicate aliases into items of their own.


def index(dump: Path, catalog: Path) -> None:
    with Catalog.create_or_open(catalog, specs()) as cat:
        index_dump(dump, cat, fake_encoders(), PipelineConfig(batch_size=8, progress=False))


def touch_all(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_reindexing_touched_files_keeps_every_alias_an_alias(
    crash_dump: Path, tmp_path: Path
) -> None:
    dump, catalog = tmp_path / "dump", tmp_path / "catalog"
    shutil.copytree(crash_dump, dump)
    index(dump, catalog)
    before = contents(catalog)
    assert before.duplicates
    touch_all(dump)  # as a copy or a restore from backup does
    index(dump, catalog)
    assert not check_catalog(catalog, tmp_path / "scratch").problems
    assert differences(contents(catalog), before, atol=1e-6) == []


def test_a_file_whose_bytes_change_moves_between_item_and_alias(
    crash_dump: Path, tmp_path: Path
) -> None:
    dump, catalog = tmp_path / "dump", tmp_path / "catalog"
    shutil.copytree(crash_dump, dump)
    index(dump, catalog)
    before = contents(catalog)
    alias_id, original_id = next(iter(before.duplicates.items()))
    with Catalog.open(catalog) as cat:
        original = cat.item(original_id)
        other = next(
            i for i in cat.iter_items() if i.id not in {original_id, *before.duplicates.values()}
        )
        assert original is not None
    # The alias's file gets bytes of its own (it must become an item); another item's file
    # becomes a copy of the original (it must become an alias).
    repaint(Path(alias_file_of(catalog, alias_id)))
    shutil.copyfile(original.file, other.file)
    index(dump, catalog)
    assert not check_catalog(catalog, tmp_path / "scratch").problems
    after = contents(catalog)
    assert alias_id in after.items and alias_id not in after.duplicates
    assert after.duplicates.get(other.id) == original_id and other.id not in after.items
    assert len(after.items) == len(before.items)


def repaint(path: Path) -> None:
    with Image.open(path) as image:
        fmt, pixels = image.format, image.convert("RGB")
    pixels.paste((3, 200, 17), (0, 0, pixels.width // 2, pixels.height // 2))
    pixels.save(path, format=fmt)


def alias_file_of(catalog: Path, alias_id: str) -> str:
    with sqlite3.connect(catalog / "catalog.sqlite") as conn:
        return str(
            conn.execute("SELECT file FROM duplicates WHERE id = ?", (alias_id,)).fetchone()[0]
        )


# =========================================================================== full disk


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs mounted at ``where`` (needs root: skips the test otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here to make a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(filesystem: Path, leave_bytes: int) -> Path:
    stat = os.statvfs(filesystem)
    ballast = filesystem / "ballast"
    ballast.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return ballast


@pytest.fixture(scope="module")
def more_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 more images (with the sample dump's broken files and duplicates) to add to a dump."""
    root = tmp_path_factory.mktemp("more")
    write_sample_dump(root, count=120, seed=4)
    return root / "images"


FAST = Harness(batch_delay_s=0.0, batch_size=8)


@pytest.fixture(scope="module")
def grown_reference(
    crash_dump: Path, more_images: Path, tmp_path_factory: pytest.TempPathFactory
) -> Contents:
    """What an uninterrupted run gives for ``crash_dump`` with ``more_images`` in ``more/``."""
    work = tmp_path_factory.mktemp("grown")
    shutil.copytree(crash_dump, work / "dump")
    shutil.copytree(more_images, work / "dump" / "more")
    catalog = work / "catalog"
    assert run_child(work / "dump", catalog, None, FAST, 0.0).returncode == 0
    return contents(catalog, work / "dump")


def fails_for_lack_of_space(run: RunResult) -> None:
    assert run.returncode == 2, run.stderr_tail  # LookalikeError: a message, not a traceback
    assert "error: No space left on device while" in run.stderr_tail, run.stderr_tail
    assert "Traceback" not in run.stderr_tail


@pytest.mark.parametrize("leave_kb", [2, 256])
def test_full_disk_fails_clearly_and_keeps_the_catalog(
    crash_dump: Path, more_images: Path, grown_reference: Contents, tmp_path: Path, leave_kb: int
) -> None:
    """The catalog on a small filesystem: the run that fills it stops with a clear error; the
    catalog still opens where it is, consistent, with every earlier item; with space freed, the
    same command completes and gives what an uninterrupted run gives."""
    dump = tmp_path / "dump"
    shutil.copytree(crash_dump, dump)
    with small_filesystem(tmp_path / "mnt", "8m") as fs:
        catalog = fs / "catalog"
        assert run_child(dump, catalog, None, FAST, 0.0).returncode == 0
        earlier = contents(catalog)
        shutil.copytree(more_images, dump / "more")
        ballast = fill(fs, leave_kb * 1024)
        fails_for_lack_of_space(run_child(dump, catalog, None, FAST, 0.0))
        state = check_catalog(catalog, tmp_path / "scratch")
        assert state.exists and not state.problems, state.problems
        with Catalog.open(catalog) as cat:  # in place, with the disk still full
            assert set(earlier.items) <= {item.id for item in cat.iter_items()}
            assert all(len(index) == len(cat) for index in cat.indexes.values())
        ballast.unlink()
        assert run_child(dump, catalog, None, FAST, 0.0).returncode == 0
        assert differences(contents(catalog, dump), grown_reference, atol=1e-6) == []


def test_full_disk_while_writing_faiss_snapshots(
    crash_dump: Path, more_images: Path, tmp_path: Path
) -> None:
    """Only the FAISS snapshots' filesystem is full: SQLite commits, the snapshot write fails;
    the catalog still opens (its indexes rebuilt from SQLite) while that disk stays full."""
    dump, catalog = tmp_path / "dump", tmp_path / "catalog"
    shutil.copytree(crash_dump, dump)
    assert run_child(dump, catalog, None, FAST, 0.0).returncode == 0
    earlier = contents(catalog)
    saved = tmp_path / "faiss-saved"
    shutil.copytree(catalog / "faiss", saved)
    shutil.copytree(more_images, dump / "more")
    with small_filesystem(catalog / "faiss", "64k") as fs:
        for snapshot in saved.iterdir():
            shutil.copy2(snapshot, fs / snapshot.name)
        fill(fs, 4096)
        run = run_child(dump, catalog, None, FAST, 0.0)
        fails_for_lack_of_space(run)
        assert ".faiss;" in run.stderr_tail
        state = check_catalog(catalog, tmp_path / "scratch")
        assert not state.problems, state.problems
        with Catalog.open(catalog) as cat:  # in place, the snapshots' disk still full
            assert len(cat) == state.items > len(earlier.items)
            assert all(len(index) == len(cat) for index in cat.indexes.values())
            assert set(earlier.items) <= {item.id for item in cat.iter_items()}


# =========================================================================== killed server


@dataclass
class Burst:
    acknowledged: list[dict[str, Any]]
    in_flight_at_kill: int
    unacknowledged: int


async def feedback_burst(
    url: str, session_id: str, image_ids: list[str], server_pid: int, kill_after: int
) -> Burst:
    """12 clients post 5-event batches back to back; the server is SIGKILLed once
    ``kill_after`` events were acknowledged. Returns the events answered 202."""
    burst = Burst([], 0, 0)
    in_flight = 0
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def client_loop(number: int) -> None:
            nonlocal in_flight
            for batch in range(10_000):
                events = [
                    {
                        "event_id": f"burst-{number}-{batch}-{k}",
                        "image_id": image_ids[(number + batch + k) % len(image_ids)],
                        "dwell_ms": 250.0 * (k + 1),
                    }
                    for k in range(5)
                ]
                in_flight += 1
                try:
                    answer = await client.post(
                        "/v1/feedback", json={"session_id": session_id, "events": events}
                    )
                except httpx.HTTPError:
                    burst.unacknowledged += len(events)
                    return
                finally:
                    in_flight -= 1
                assert answer.status_code == 202, answer.text
                assert answer.json() == {"accepted": 5, "duplicates": 0}
                burst.acknowledged.extend(events)

        async def killer() -> None:
            while len(burst.acknowledged) < kill_after:
                await asyncio.sleep(0.002)
            burst.in_flight_at_kill = in_flight
            os.kill(server_pid, signal.SIGKILL)

        await asyncio.gather(killer(), *(client_loop(n) for n in range(12)))
    return burst


def test_feedback_acknowledged_before_a_server_kill_survives_it(
    pixels_catalog: Path, tmp_path: Path
) -> None:
    catalog, image_ids = writable_copy(pixels_catalog, tmp_path)
    log = tmp_path / "server.log"
    with serving(catalog, log) as (url, pid):
        session = httpx.post(f"{url}/v1/search", json={"image_id": image_ids[0]}).json()
        burst = asyncio.run(feedback_burst(url, session["session_id"], image_ids, pid, 400))
    assert len(burst.acknowledged) >= 400 and burst.in_flight_at_kill > 0
    assert "Traceback" not in log.read_text()
    with serving(catalog, log) as (url, _):  # restarted: sessions are gone, stored events are not
        session = httpx.post(f"{url}/v1/search", json={"image_id": image_ids[0]}).json()
        for start in range(0, len(burst.acknowledged), 1000):
            chunk = burst.acknowledged[start : start + 1000]
            replay = httpx.post(
                f"{url}/v1/feedback", json={"session_id": session["session_id"], "events": chunk}
            )
            assert replay.status_code == 202
            assert replay.json() == {"accepted": 0, "duplicates": len(chunk)}
    with sqlite3.connect(catalog / "catalog.sqlite") as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM feedback")}
    assert {event["event_id"] for event in burst.acknowledged} <= stored
    print(  # the figures benchmarks/RESULTS.md quotes (visible with -s)
        f"\nfeedback burst: {len(burst.acknowledged)} events acknowledged, "
        f"{burst.in_flight_at_kill} requests in flight at the kill, "
        f"{burst.unacknowledged} events unacknowledged; all acknowledged ones stored"
    )


def test_sigterm_stops_the_server_through_its_shutdown(
    pixels_catalog: Path, tmp_path: Path
) -> None:
    """A supervisor's SIGTERM (systemd, docker stop) ends the server after it closed its
    engine: uvicorn raises the signal again once it has drained, which under the default
    action ended the process before the engine's close, leaving SQLite's WAL (and a
    generator's unwritten snapshots) behind."""
    catalog, image_ids = writable_copy(pixels_catalog, tmp_path)
    exits: list[int | None] = []
    with serving(catalog, tmp_path / "server.log", exits=exits) as (url, _):
        session = httpx.post(f"{url}/v1/search", json={"image_id": image_ids[0]}).json()
        events = [
            {"event_id": f"sigterm-{n}", "image_id": item["id"], "dwell_ms": 1500.0}
            for n, item in enumerate(session["items"][:3])
        ]
        sent = httpx.post(
            f"{url}/v1/feedback", json={"session_id": session["session_id"], "events": events}
        )
        assert sent.status_code == 202, sent.text
        assert (catalog / "catalog.sqlite-wal").exists()  # the write is in the WAL for now
    assert exits == [0], (tmp_path / "server.log").read_text()[-2000:]
    assert not (catalog / "catalog.sqlite-wal").exists()  # the engine closed the catalog
    with sqlite3.connect(catalog / "catalog.sqlite") as conn:
        stored = {row[0] for row in conn.execute("SELECT event_id FROM feedback")}
    assert {e["event_id"] for e in events} <= stored


def test_opening_a_catalog_on_a_full_disk_says_so(crash_dump: Path, tmp_path: Path) -> None:
    """SQLite reports the full disk it meets creating its shared-memory file as a bare
    "disk I/O error"; the catalog names the cause."""
    with small_filesystem(tmp_path / "mnt", "8m") as fs:
        index(crash_dump, fs / "catalog")
        database = fs / "catalog" / "catalog.sqlite"
        conn = sqlite3.connect(database)  # the last connection out removes -wal and -shm
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        assert not database.with_name("catalog.sqlite-shm").exists()
        fill(fs, 0)
        with pytest.raises(DiskFullError, match="No space left on device while opening"):
            Catalog.open(fs / "catalog")
