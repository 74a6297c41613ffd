"""Several serving processes over one catalog: session ownership by id, calls forwarded to the
owner over the peer sockets, errors carried back whole, and `lookalike serve --workers 2`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest

from indexer.catalog import Catalog
from indexer.errors import ImageRejected
from recommender.api import FeedbackEvent, ItemQuery
from recommender.engine import Engine
from recommender.errors import SessionOwnerUnavailableError, UnknownSessionError
from service.routes.deps import for_session
from service.routes.feedback import feedback as feedback_route
from service.schemas import EventIn, FeedbackIn
from service.workers import PeerOwners, PeerServer, Shard, listening_sockets, peering
from tests.cli_helpers import serving, writable_copy

T = TypeVar("T")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 108 bytes, which pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="lk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def catalog(pixels_catalog: Path, tmp_path: Path) -> Iterator[Catalog]:
    shutil.copytree(pixels_catalog, tmp_path / "catalog")  # feedback writes to it
    with Catalog.open(tmp_path / "catalog") as opened:
        yield opened


def shards(run_dir: Path, count: int) -> list[Shard]:
    key = b"k" * 32
    return [Shard(i, count, run_dir, key) for i in range(count)]


class Worker:
    """One worker's engine with its peers served on an event loop in a thread of its own, as
    ``serve --workers`` runs it on its serving loop."""

    def __init__(self, catalog: Catalog, shard: Shard) -> None:
        self.owners = PeerOwners(shard)
        self.engine = Engine(catalog, {}, owners=self.owners, seed=0)
        self.server = PeerServer(shard, self.engine, self.owners)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._enter())

    async def _enter(self) -> None:
        self._peering = peering(self.owners, self.server)
        await self._peering.__aenter__()

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        """Run ``call`` on this worker's loop; its result."""
        return asyncio.run_coroutine_threadsafe(call, self.loop).result(30)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.run(self._peering.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextlib.contextmanager
def workers(catalog: Catalog, run_dir: Path, count: int = 2) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for shard in shards(run_dir, count):
            started.append(Worker(catalog, shard))
        yield started
    finally:
        for worker in started:
            worker.stop()


def test_a_worker_makes_ids_that_name_it(run_dir: Path) -> None:
    for shard in shards(run_dir, 3):
        owners = PeerOwners(shard)
        ids = {owners.new_session_id() for _ in range(50)}
        assert len(ids) == 50 and all(len(i) == 32 for i in ids)
        assert {shard.owner(i) for i in ids} == {shard.index}
        assert all(owners.owns(i) for i in ids)


def test_domain_errors_cross_processes_whole() -> None:
    rejected = pickle.loads(pickle.dumps(ImageRejected("too_large", "18000 x 18000 pixels")))
    assert (rejected.reason, str(rejected)) == ("too_large", "18000 x 18000 pixels")
    unknown = pickle.loads(pickle.dumps(UnknownSessionError("abc")))
    assert unknown.session_id == "abc" and str(unknown) == str(UnknownSessionError("abc"))


def test_a_call_for_another_workers_session_runs_in_that_worker(
    catalog: Catalog, run_dir: Path
) -> None:
    with workers(catalog, run_dir) as (first, second):
        owner, other = first.engine, second.engine
        ids = [item.id for item in catalog.iter_items()]
        page = owner.search(ItemQuery(ids[0]))
        session_id = page.session_id
        assert first.owners.owns(session_id)

        # Every session-bound call made in the other worker runs in the owner.
        second_page = other.feed(session_id)
        assert second_page.items and second_page.session_id == session_id
        assert not {i.id for i in page.items} & {i.id for i in second_page.items}
        events = [FeedbackEvent(uuid.uuid4().hex, i.id, 2_500.0) for i in second_page.items]
        assert other.feedback(session_id, events).accepted == len(events)
        assert other.session_info(session_id).served == len(page.items) + len(second_page.items)
        assert owner.session_info(session_id).feedback_events == len(events)
        restarted = other.search(ItemQuery(ids[1]), session_id=session_id)
        assert restarted.session_id == session_id
        assert len(other.sessions) == 0 and len(owner.sessions) == 1

        # The owner's errors come back as the same errors.
        other.delete_session(session_id)
        with pytest.raises(UnknownSessionError) as missing:
            other.feed(session_id)
        assert missing.value.session_id == session_id


def test_forwarded_pages_and_steering_run_on_the_owners_event_loop_commits_off_it(
    catalog: Catalog, run_dir: Path
) -> None:
    """As the owner's routes run its own calls: a page and feedback's steering on the serving
    loop's thread (no second thread contending for the GIL), feedback's commit, which waits on
    the disk, off it; and the asking worker awaits the answer on its own loop."""
    with workers(catalog, run_dir) as (first, second):
        owner = first.engine
        ran_on: dict[str, int] = {}

        def recorded(name: str) -> Any:
            method = getattr(owner, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                ran_on[name] = threading.get_ident()
                return method(*args, **kwargs)

            return call

        session_id = owner.search(ItemQuery(next(iter(catalog.iter_items())).id)).session_id
        for name in ("feed", "store_feedback", "steer_with"):
            setattr(owner, name, recorded(name))
        page = second.run(for_session(second.engine, session_id, "feed", session_id, None))
        assert ran_on["feed"] == first.thread.ident
        events = [
            EventIn(event_id=uuid.uuid4().hex, image_id=i.id, dwell_ms=2_500.0) for i in page.items
        ]
        answer = second.run(
            feedback_route(second.engine, FeedbackIn(session_id=session_id, events=events))
        )
        assert answer.accepted == len(events)
        assert ran_on["steer_with"] == first.thread.ident
        assert ran_on["store_feedback"] not in (first.thread.ident, second.thread.ident)
        assert owner.session_info(session_id).feedback_events == len(events)
        # A worker that has stopped answers no more: the caller is told so, not left hanging.
        first.stop()
        with pytest.raises(SessionOwnerUnavailableError, match="worker 0"):
            second.engine.feed(session_id)


def test_a_forward_cancelled_midway_leaves_its_answer_to_no_other_call(
    catalog: Catalog, run_dir: Path
) -> None:
    """A client that leaves cancels its route's forward: the answer still comes, over the link
    the next call uses, and must not be taken for that call's."""
    with workers(catalog, run_dir) as (first, second):
        owner = first.engine
        session_id = owner.search(ItemQuery(next(iter(catalog.iter_items())).id)).session_id
        info = owner.session_info

        def slow_info(*args: Any) -> Any:
            time.sleep(0.3)
            return info(*args)

        owner.session_info = slow_info  # type: ignore[method-assign]

        async def leave_then_scroll() -> Any:
            asking = asyncio.ensure_future(
                second.owners.forward(session_id, "session_info", session_id)
            )
            await asyncio.sleep(0.1)
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            return await second.owners.forward(session_id, "feed", session_id, None)

        page = second.run(leave_then_scroll())
        assert page.session_id == session_id and page.items


class Unreadable:
    """Pickles, but raises when unpickled (as a class missing on the reading side would)."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse, ())


def _refuse() -> None:
    raise AttributeError("no such class here")


def test_an_answer_that_cannot_be_read_fails_its_call_at_once_and_the_link_reopens(
    catalog: Catalog, run_dir: Path
) -> None:
    with workers(catalog, run_dir) as (first, second):
        session_id = first.engine.search(ItemQuery(next(iter(catalog.iter_items())).id)).session_id
        info = first.engine.session_info
        first.engine.session_info = lambda *args: Unreadable()  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(SessionOwnerUnavailableError, match="worker 0"):
            second.engine.session_info(session_id)
        assert time.monotonic() - started < 5  # not left waiting for the call's timeout
        first.engine.session_info = info  # type: ignore[method-assign]
        assert second.engine.session_info(session_id).session_id == session_id


def test_a_page_is_not_held_up_by_a_slow_call_on_the_same_link(
    catalog: Catalog, run_dir: Path
) -> None:
    """Calls to one worker share a connection: a search waiting on a thread there (encoding an
    image) must not make the pages asked after it wait too."""
    with workers(catalog, run_dir) as (first, second):
        owner = first.engine
        ids = [item.id for item in catalog.iter_items()]
        session_id = owner.search(ItemQuery(ids[0])).session_id
        search = owner.search
        answered: list[str] = []

        def slow_search(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)
            return search(*args, **kwargs)

        owner.search = slow_search  # type: ignore[method-assign]

        async def search_then_scroll() -> None:
            async def ask(name: str, *args: Any, **kwargs: Any) -> None:
                await second.owners.forward(session_id, name, *args, **kwargs)
                answered.append(name)

            await asyncio.gather(
                ask("search", ItemQuery(ids[1]), session_id=session_id),
                ask("feed", session_id, None),
                ask("session_info", session_id),
            )

        second.run(search_then_scroll())
        assert answered == ["feed", "session_info", "search"]


def test_a_peer_without_the_workers_key_is_refused(catalog: Catalog, run_dir: Path) -> None:
    with workers(catalog, run_dir) as (first, second):
        session_id = first.engine.create_session()
        stranger = PeerOwners(Shard(1, 2, run_dir, b"x" * 32))
        with pytest.raises(SessionOwnerUnavailableError, match="worker 0"):
            second.run(stranger.forward(session_id, "session_info", session_id))
        # The worker goes on answering its peers.
        assert second.engine.session_info(session_id).session_id == session_id


def test_a_call_runs_on_the_event_loop_for_a_session_held_here_over_faiss_else_awaits_its_owner(
    catalog: Catalog,
) -> None:
    class HereOnly:  # the part of SessionOwners the helper asks: is the session held here?
        def owns(self, session_id: str) -> bool:
            return session_id == "held-here"

        def new_session_id(self) -> str:
            return "held-here"

        async def forward(self, session_id: str, method: str, *args: Any) -> Any:
            return ("forwarded", method, threading.get_ident())

    engine = Engine(catalog, {}, owners=cast(Any, HereOnly()), seed=0)
    engine.ident = threading.get_ident  # type: ignore[attr-defined]

    async def ran_on(session_id: str) -> Any:
        return await for_session(engine, session_id, "ident"), threading.get_ident()

    here, loop_thread = asyncio.run(ran_on("held-here"))
    assert here == loop_thread
    (forwarded, method, awaited_on), loop_thread = asyncio.run(ran_on("held-elsewhere"))
    assert (forwarded, method, awaited_on) == ("forwarded", "ident", loop_thread)
    catalog.store = dataclasses.replace(catalog.store, kind="milvus")  # searches over a socket
    here, loop_thread = asyncio.run(ran_on("held-here"))
    assert here != loop_thread


def test_the_feedback_route_commits_in_a_thread_and_steers_on_the_event_loop(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(catalog, {}, seed=0)
    page = engine.search(ItemQuery(next(iter(catalog.iter_items())).id))
    ran_on: dict[str, int] = {}
    for name in ("store_feedback", "steer_with"):
        method = getattr(engine, name)

        def call(*args: Any, _name: str = name, _method: Any = method) -> Any:
            ran_on[_name] = threading.get_ident()
            return _method(*args)

        monkeypatch.setattr(engine, name, call)
    shown = [EventIn(event_id=uuid.uuid4().hex, image_id=i.id, dwell_ms=900.0) for i in page.items]
    body = FeedbackIn(session_id=page.session_id, events=shown)

    async def post() -> int:
        answer = await feedback_route(engine, body)
        assert answer.accepted == len(page.items)
        return threading.get_ident()

    loop_thread = asyncio.run(post())
    assert ran_on["steer_with"] == loop_thread
    assert ran_on["store_feedback"] != loop_thread


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing is Linux's")
def test_workers_listen_on_one_port_with_a_socket_each_and_connections_spread() -> None:
    socks = listening_sockets("127.0.0.1", 0, 2)
    clients: list[socket.socket] = []
    try:
        (port,) = {sock.getsockname()[1] for sock in socks}
        assert socks[0] is not socks[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        accepted = []
        for sock in socks:
            sock.setblocking(False)
            count = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock.accept()[0].close()
                    count += 1
            accepted.append(count)
        # A shared socket gave one worker 7 or 8 of 8; here each gets a share (by a hash of
        # the client's address: all 32 on one socket has odds of 2 in 2**32).
        assert sum(accepted) == 32 and min(accepted) > 0
    finally:
        for each in [*clients, *socks]:
            each.close()


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT balancing is Linux's")
def test_workers_refuse_a_port_another_server_with_workers_listens_on() -> None:
    other = listening_sockets("127.0.0.1", 0, 2)  # a running `serve --workers 2`
    try:
        port = other[0].getsockname()[1]
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", port, 2)
    finally:
        for sock in other:
            sock.close()
    socks = listening_sockets("127.0.0.1", port, 2)  # free again: taken
    for sock in socks:
        sock.close()


def test_new_sessions_are_spread_over_the_workers_whichever_one_was_asked(
    catalog: Catalog, run_dir: Path
) -> None:
    with workers(catalog, run_dir) as (first, second):
        item = next(iter(catalog.iter_items())).id
        made = [first.engine.create_session() for _ in range(4)]
        made += [first.engine.search(ItemQuery(item)).session_id for _ in range(4)]
        assert len(first.engine.sessions) == len(second.engine.sessions) == 4
        assert all(second.engine.feed(session_id).session_id == session_id for session_id in made)


def test_an_owner_that_does_not_answer_is_reported_as_such(catalog: Catalog, run_dir: Path) -> None:
    first, second = shards(run_dir, 2)
    owner = Engine(catalog, {}, owners=PeerOwners(first), seed=0)
    session_id = owner.create_session()  # its worker serves no peers: it is down
    other = Worker(catalog, second)
    try:
        with pytest.raises(SessionOwnerUnavailableError, match="worker 0"):
            other.engine.feed(session_id)
    finally:
        other.stop()
    # A worker whose loop does not run (not serving yet, or stopped) forwards nothing.
    with pytest.raises(SessionOwnerUnavailableError, match="not serving"):
        Engine(catalog, {}, owners=PeerOwners(second), seed=0).feed(session_id)


def test_serve_with_two_workers_scrolls_from_any_connection_and_stops_cleanly(
    pixels_catalog: Path, tmp_path: Path
) -> None:
    catalog, ids = writable_copy(pixels_catalog, tmp_path)
    log = tmp_path / "server.log"
    exits: list[int | None] = []
    with serving(catalog, log, "--workers", "2", exits=exits) as (url, pid):
        sessions = []
        for image_id in ids[:6]:  # each request on a new connection: any worker may take it
            answer = httpx.post(
                f"{url}/v1/search", json={"image_id": image_id, "limit": 5}, timeout=30
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            sessions.append((body["session_id"], [item["id"] for item in body["items"]]))
        for session_id, served in sessions:
            for _ in range(3):
                page = httpx.get(
                    f"{url}/v1/feed", params={"session_id": session_id, "limit": 5}, timeout=30
                )
                assert page.status_code == 200, page.text
                served += [item["id"] for item in page.json()["items"]]
                events = [
                    {"event_id": uuid.uuid4().hex, "image_id": i, "dwell_ms": 1800.0}
                    for i in served[-5:]
                ]
                sent = httpx.post(
                    f"{url}/v1/feedback",
                    json={"session_id": session_id, "events": events},
                    timeout=30,
                )
                assert sent.status_code == 202, sent.text
            assert len(served) == len(set(served)) == 20  # never a repeat, whoever answered
        # Two signals at once (Ctrl-C in a terminal signals the whole group; a supervisor may
        # repeat itself): the parent still stops its workers and exits.
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not exited(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    text = log.read_text()
    assert exits == [0], text[-3000:]  # SIGTERM: the workers stopped, and the parent cleanly
    assert text.count('"message":"serving catalog') == 2  # both workers served
    assert "Traceback" not in text and "worker exited" not in text
    assert "leaked" not in text  # each worker left through multiprocessing's clean-up
    # ...and closed its engine first, which folds the WAL: two workers closing at once may
    # leave the file (each saw the other still open), but empty.
    wal = catalog / "catalog.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def exited(pid: int) -> bool:
    """True once the child ``pid`` has exited (a zombie until its parent collects it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_generation_needs_a_single_worker() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="single worker"):
        Settings(workers=2, generator="sample")
    assert Settings(workers=2).workers == 2
