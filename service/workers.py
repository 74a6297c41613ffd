"""More than one serving process over one catalog: ``lookalike serve --workers N``.

One Python process builds one page at a time (the GIL), so it uses about one core whatever its
thread count. Here N worker processes listen on one port (on Linux a socket each, bound with
SO_REUSEPORT, so that the kernel spreads connections evenly), and each opens the catalog and
holds its indexes in memory.

A session lives in one worker: the one its id names, ``crc32(id) mod N``. A worker makes ids
that name itself, and a call for another worker's session (feed, feedback, a search that
restarts it, its info, mute, delete) runs in the owner: the engine forwards it over a Unix
socket (``multiprocessing.connection``, authenticated by a key made at start-up) and returns
what the owner answered or raises what it raised. New sessions are spread round robin over the
workers, whichever one the client reached. Feedback is stored by the owner, in the catalog's
SQLite, as with one process; a worker that does not answer its peers makes their calls for its
sessions 503 ``worker_unavailable``.

Not shared between workers: ``/metrics`` (each answers for itself), rate-limit buckets (a client
gets at most N times its limit), and generation, which is refused with more than one worker:
a generated image would enter one worker's index only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from types import FrameType
from typing import Any

from recommender.engine import Engine
from recommender.errors import SessionOwnerUnavailableError
from recommender.sessions import new_session_id
from service.app import configure_logging, open_engine, serve_engine
from service.settings import Settings

log = logging.getLogger(__name__)

# What a worker runs for another: the engine's session-bound methods, nothing else.
FORWARDED = frozenset(
    {"create_session", "search", "feed", "feedback", "session_info", "mute", "delete_session"}
)
# Those of them that the routes run on the event loop's thread for a session held here (short
# CPU work, see ``for_session``). Feedback is split as its route splits it (the commit on the
# thread its connection arrived on, the steering on the loop); search, which encodes images,
# stays on that thread, as it runs in the thread pool here.
ON_LOOP = frozenset({"feed", "session_info", "mute", "delete_session"})
STOP_GRACE_S = 30.0
# How long a forwarded call may wait for this worker's event loop to run it.
PEER_CALL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Shard:
    """Worker ``index`` of ``count``: which sessions it holds and where its peers listen."""

    index: int
    count: int
    run_dir: Path
    authkey: bytes

    def owner(self, session_id: str) -> int:
        return zlib.crc32(session_id.encode()) % self.count

    def address(self, index: int) -> str:
        return str(self.run_dir / f"worker-{index}.sock")


class PeerOwners:
    """``SessionOwners`` for worker processes: ownership by id, calls forwarded to the owner.

    Each peer gets a pool of open connections (a connection carries one call at a time).
    """

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._idle: dict[int, list[Connection]] = {}
        self._lock = threading.Lock()
        self._next_home = itertools.count(shard.index)
        self._answering = threading.local()  # set in threads that run a peer's calls

    def owns(self, session_id: str) -> bool:
        return self.shard.owner(session_id) == self.shard.index

    def new_session_id(self) -> str:
        # Rejection sampling keeps the id uniform among those naming this worker: it loses
        # log2(N) of its 192 random bits.
        while True:
            session_id = new_session_id()
            if self.owns(session_id):
                return session_id

    def home_for_new_session(self) -> int | None:
        # Round robin from each worker: a client that sends all its searches over one
        # connection (to one worker) still spreads its sessions, and their pages, over all.
        # A call a peer sent here stays here, or it could be sent on and on.
        if getattr(self._answering, "active", False):
            return None
        with self._lock:
            home = next(self._next_home) % self.shard.count
        return None if home == self.shard.index else home

    @contextlib.contextmanager
    def answering_a_peer(self) -> Iterator[None]:
        self._answering.active = True
        try:
            yield
        finally:
            self._answering.active = False

    def call(self, session_id: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return self.call_in(self.shard.owner(session_id), method, *args, **kwargs)

    def call_in(self, owner: int, method: str, /, *args: Any, **kwargs: Any) -> Any:
        conn = None
        try:
            conn = self._connection(owner)
            conn.send((method, args, kwargs))
            ok, value = conn.recv()
        except (OSError, EOFError) as exc:
            if conn is not None:
                conn.close()
            raise SessionOwnerUnavailableError(
                f"the worker holding this session (worker {owner}) did not answer"
            ) from exc
        with self._lock:
            self._idle.setdefault(owner, []).append(conn)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()

    def _connection(self, owner: int) -> Connection:
        with self._lock:
            idle = self._idle.get(owner)
            if idle:
                return idle.pop()
        return Client(self.shard.address(owner), family="AF_UNIX", authkey=self.shard.authkey)


class PeerServer:
    """Answers the forwarded calls of the other workers with this worker's engine.

    A connection's calls arrive on a thread of their own. Those in ``ON_LOOP``, and the
    steering half of feedback, run on the serving event loop's thread once ``attach`` gave it
    one, as the routes run this worker's own: two threads running engine code contend for the
    GIL, which made a forwarded page cost more CPU than one served where it arrived (2 workers
    at 1M: 7.8-8.2 against 6.2-7.4 ms a request, 223-234 against 254-308 pages a second).
    """

    def __init__(self, shard: Shard, engine: Engine, owners: PeerOwners) -> None:
        self._engine = engine
        self._owners = owners
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener = Listener(
            shard.address(shard.index), family="AF_UNIX", authkey=shard.authkey
        )
        self._thread = threading.Thread(target=self._accept, name="peer-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run forwarded calls on ``loop``'s thread from now on."""
        self._loop = loop

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except OSError:
                return  # closed
            except Exception:  # noqa: BLE001 - a failed handshake must not stop the listener
                log.warning("a peer connection failed its handshake", exc_info=True)
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    method, args, kwargs = conn.recv()
                except (EOFError, OSError):
                    return
                answer = self._run(method, args, kwargs)
                try:
                    conn.send(answer)
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    # Pickling fails before anything is sent: the caller still gets an answer.
                    failure = RuntimeError(f"{method} answered what cannot be sent: {exc}")
                    conn.send((False, failure))

    def _run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
        if method not in FORWARDED:
            return False, SessionOwnerUnavailableError(f"{method!r} is not forwarded")
        engine = self._engine
        loop = self._loop
        # Over Milvus a page waits on its server's answer: that wait stays off the loop.
        if loop is None or loop.is_closed() or not engine.searches_in_process:
            return self._call(getattr(engine, method), args, kwargs)
        if method == "feedback":  # as the route does: the commit here, the steering there
            ok, stored = self._call(engine.store_feedback, args, kwargs)
            return self._on_loop(loop, engine.steer_with, (stored,)) if ok else (ok, stored)
        if method in ON_LOOP:
            return self._on_loop(loop, getattr(engine, method), args, kwargs)
        return self._call(getattr(engine, method), args, kwargs)

    def _on_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
    ) -> tuple[bool, Any]:
        """``_call`` on the event loop's thread, waiting for it here."""

        async def on_loop() -> tuple[bool, Any]:
            return self._call(func, args, kwargs or {})

        call = on_loop()
        try:
            future = asyncio.run_coroutine_threadsafe(call, loop)
        except RuntimeError as exc:  # the loop closed meanwhile: this worker is stopping
            call.close()
            return False, SessionOwnerUnavailableError(f"{func.__name__} was not run: {exc}")
        try:
            return future.result(PEER_CALL_TIMEOUT_S)
        except (TimeoutError, concurrent.futures.CancelledError) as exc:
            future.cancel()  # the loop stopped, or is stuck: the caller gets a 503
            return False, SessionOwnerUnavailableError(f"{func.__name__} was not run: {exc!r}")

    def _call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        try:
            with self._owners.answering_a_peer():
                return True, func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the caller raises it, as if it ran there
            return False, exc


def serve_workers(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes listening on one port until SIGINT or
    SIGTERM (or a worker's unexpected exit); returns the exit status. The main loop of the
    ``serve`` process: it keeps its signal handlers when it returns."""
    try:
        socks = listening_sockets(settings.host, settings.port, settings.workers)
    except OSError as exc:  # as uvicorn does for one process: say so, exit 1
        log.error("cannot listen on %s port %d: %s", settings.host, settings.port, exc)
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="lookalike-workers-"))  # mode 0700
    authkey = os.urandom(32)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main,
            args=(settings, Shard(i, settings.workers, run_dir, authkey), socks[i]),
            name=f"lookalike-worker-{i}",
        )
        for i in range(settings.workers)
    ]
    requested = False  # a signal asked to stop (else a worker exited on its own)

    def stop(signum: int, frame: FrameType | None) -> None:
        # No locks here: a second signal can arrive while this handler runs.
        nonlocal requested
        requested = True
        _terminate(workers)

    # Left in place on return: this is the process's last work, and a signal that comes while
    # it exits (a supervisor repeating itself) must not turn a clean stop into a killed one.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        for worker in workers:
            worker.start()
        for sock in socks:
            sock.close()  # the workers hold them now
        wait([worker.sentinel for worker in workers])  # until the first one exits
        asked = requested
        if not asked:
            log.error("a worker exited (%s): stopping the others", _statuses(workers))
            _terminate(workers)
        for worker in workers:
            worker.join(STOP_GRACE_S)
            if worker.exitcode is None:
                worker.kill()
                worker.join()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    clean = asked and all(w.exitcode in (0, -signal.SIGTERM) for w in workers)
    return 0 if clean else 1


def _terminate(workers: list[Any]) -> None:
    for worker in workers:
        if worker.pid is not None and worker.exitcode is None:
            os.kill(worker.pid, signal.SIGTERM)


def _worker_main(settings: Settings, shard: Shard, sock: socket.socket) -> None:
    configure_logging(json_lines=settings.log_json, access_log=settings.access_log)
    owners = PeerOwners(shard)
    engine = open_engine(settings, owners=owners)
    peers = PeerServer(shard, engine, owners)
    try:
        engine.load()
        peers.start()
        serve_engine(settings, engine, sock, on_loop=peers.attach)
    finally:
        peers.close()
        owners.close()
        engine.close()


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """The workers' listening sockets, one each where Linux balances connections between
    sockets bound with SO_REUSEPORT (else one socket they all share).

    On a shared socket, the worker that wakes first accepts every connection pending, so the
    few keep-alive connections of a client or a proxy land mostly in one worker (7 or 8 of 8
    in a test), which then parses and forwards every request while the other idles. With a
    socket each, the kernel spreads connections over the workers by a hash of their addresses.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    balanced = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
    socks: list[socket.socket] = []
    try:
        for _ in range(count if balanced else 1):
            sock = socket.create_server(
                (host, port), family=family, backlog=2048, reuse_port=balanced
            )
            sock.set_inheritable(True)
            socks.append(sock)
            port = sock.getsockname()[1]  # port 0: the others join the port the first got
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks if balanced else socks * count


def _statuses(workers: list[Any]) -> str:
    return ", ".join(f"{w.name}: {w.exitcode}" for w in workers if w.exitcode is not None)
