"""More than one serving process over one catalog: ``lookalike serve --workers N``.

One Python process builds one page at a time (the GIL), so it uses about one core whatever its
thread count. Here N worker processes listen on one port (on Linux a socket each, bound with
SO_REUSEPORT, so that the kernel spreads connections evenly), and each opens the catalog and
holds its indexes in memory.

A session lives in one worker: the one its id names, ``crc32(id) mod N``. A worker makes ids
that name itself, and a call for another worker's session (feed, feedback, a search that
restarts it, its info, mute, delete) runs in the owner: it is forwarded over a Unix socket
(pickles, after a handshake on a key made at start-up) and returns what the owner answered or
raises what it raised. Both ends of a forward run on the workers' event loops, the routes
awaiting the owner without holding a thread (the engine's own forwards, from a thread, hand
their call to the loop), and the owner running pages and steering on its loop as it runs its
own sessions'. New sessions are spread round robin over the
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
import hmac
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.concurrency import run_in_threadpool

from recommender.engine import Engine
from recommender.errors import SessionOwnerUnavailableError
from recommender.sessions import new_session_id
from service.app import configure_logging, open_engine, serve_engine
from service.routes.deps import feedback_here
from service.settings import Settings

log = logging.getLogger(__name__)

# What a worker runs for another: the engine's session-bound methods, nothing else.
FORWARDED = frozenset(
    {"create_session", "search", "feed", "feedback", "session_info", "mute", "delete_session"}
)
# Those of them that the owner runs on its event loop's thread, as its routes run its own
# sessions' calls (short CPU work, see ``routes.deps.for_session``). Feedback is split as its
# route splits it (the commit in a thread, the steering on the loop); search, which encodes
# images, runs in a thread.
ON_LOOP = frozenset({"feed", "session_info", "mute", "delete_session"})
STOP_GRACE_S = 30.0
# How long a forwarded call may take, queueing included, before the caller gives up (503).
PEER_CALL_TIMEOUT_S = 120.0
# How long a new peer connection may take to prove it knows the key.
HANDSHAKE_TIMEOUT_S = 10.0

# The peer protocol: a frame is a 4-byte big-endian length and a pickle. Nothing is unpickled
# before the handshake, in which each side proves it holds the shared key: an HMAC-SHA256 of
# a fresh nonce the other side sent, labelled with its role so that an answer cannot be
# replayed the other way.
_LENGTH = struct.Struct("!I")
_NONCE_BYTES = 32


class HandshakeError(ConnectionError):
    """A peer connection whose other end did not prove it holds the workers' key."""


def _proof(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.digest(key, role + nonce, "sha256")


async def _prove_as_server(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes
) -> None:
    nonce = os.urandom(_NONCE_BYTES)
    writer.write(nonce)
    await writer.drain()
    answer = await reader.readexactly(2 * _NONCE_BYTES)  # the client's proof, then its nonce
    if not hmac.compare_digest(answer[:_NONCE_BYTES], _proof(key, b"client", nonce)):
        raise HandshakeError("the peer does not hold the workers' key")
    writer.write(_proof(key, b"server", answer[_NONCE_BYTES:]))
    await writer.drain()


async def _prove_as_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes
) -> None:
    nonce = os.urandom(_NONCE_BYTES)
    writer.write(_proof(key, b"client", await reader.readexactly(_NONCE_BYTES)) + nonce)
    await writer.drain()
    if not hmac.compare_digest(
        await reader.readexactly(_NONCE_BYTES), _proof(key, b"server", nonce)
    ):
        raise HandshakeError("the worker listening there does not hold the workers' key")


def _frame(value: Any) -> bytes:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


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

    Forwarding runs on this worker's event loop (``attach``): a route awaits ``forward``
    without holding a thread, and ``call`` (the engine's, from a thread) hands its call to the
    loop and waits. All calls to one peer share one connection (``_PeerLink``), opened on the
    first and again after a failure.
    """

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._links: dict[int, asyncio.Future[_PeerLink]] = {}  # used on the loop's thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._next_home = itertools.count(shard.index)
        self._answering = threading.local()  # set in threads that run a peer's calls

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Forward calls over ``loop``, this worker's serving loop, from now on."""
        self._loop = loop

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

    async def forward(self, session_id: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return await self.forward_to(self.shard.owner(session_id), method, *args, **kwargs)

    async def forward_to(self, owner: int, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Run the engine's ``method`` in worker ``owner``: its result, or what it raised."""
        try:
            async with asyncio.timeout(PEER_CALL_TIMEOUT_S):
                link = await self._link(owner)
                ok, value = await link.call(method, args, kwargs)
        except (OSError, EOFError, TimeoutError) as exc:  # HandshakeError is an OSError
            raise SessionOwnerUnavailableError(
                f"the worker holding this session (worker {owner}) did not answer"
            ) from exc
        if not ok:
            raise value
        return value

    async def _link(self, owner: int) -> _PeerLink:
        opening = self._links.get(owner)
        if opening is None or _failed(opening):
            address = self.shard.address(owner)
            opening = asyncio.ensure_future(_PeerLink.open(address, self.shard.authkey))
            self._links[owner] = opening
        # Shielded: the calls that wait for one opening share it, and one of them being
        # cancelled (its client left) must not fail the others.
        return await asyncio.shield(opening)

    def call(self, session_id: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return self.call_in(self.shard.owner(session_id), method, *args, **kwargs)

    def call_in(self, owner: int, method: str, /, *args: Any, **kwargs: Any) -> Any:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise SessionOwnerUnavailableError("this worker is not serving: it forwards nothing")
        if _running_loop() is loop:
            raise RuntimeError("a blocking forward on the event loop's thread: await forward()")
        call = self.forward_to(owner, method, *args, **kwargs)
        try:
            future = asyncio.run_coroutine_threadsafe(call, loop)
        except RuntimeError as exc:  # the loop closed meanwhile: this worker is stopping
            call.close()
            raise SessionOwnerUnavailableError(f"{method} was not forwarded: {exc}") from exc
        try:
            return future.result(PEER_CALL_TIMEOUT_S + HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, concurrent.futures.CancelledError) as exc:
            future.cancel()  # the loop stopped, or is stuck
            raise SessionOwnerUnavailableError(f"{method} was not forwarded: {exc!r}") from exc

    async def close(self) -> None:
        for opening in self._links.values():
            if not opening.done():
                opening.cancel()
            elif not _failed(opening):
                opening.result().close()
        self._links.clear()


def _failed(opening: asyncio.Future[_PeerLink]) -> bool:
    """Whether a link being opened failed to open, or broke since."""
    if not opening.done():
        return False
    return opening.cancelled() or opening.exception() is not None or opening.result().broken


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _PeerLink:
    """A connection to another worker's ``PeerServer``, past the handshake, carrying any number
    of calls at once: each call is numbered, and a reader task hands each answer to the call
    that waits for it. A call that is cancelled (its client left) leaves its answer unread, and
    the link in step; a link that breaks fails the calls waiting on it.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._waiting: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._numbers = itertools.count()
        self.broken = False
        self._reading = asyncio.ensure_future(self._read_answers(reader))

    @classmethod
    async def open(cls, address: str, key: bytes) -> _PeerLink:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(address), HANDSHAKE_TIMEOUT_S
        )
        try:
            await asyncio.wait_for(_prove_as_client(reader, writer, key), HANDSHAKE_TIMEOUT_S)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    async def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        if self.broken:
            raise ConnectionResetError("the link to this worker broke")
        number = next(self._numbers)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        try:
            self._writer.write(_frame((number, method, args, kwargs)))
            await self._writer.drain()
            return await answer
        finally:
            del self._waiting[number]

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                number, answer = await _read_frame(reader)
                waiting = self._waiting.get(number)
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except asyncio.CancelledError:
            reason: BaseException = ConnectionAbortedError("this worker closed the link")
        except Exception as exc:  # noqa: BLE001 - the stream ended, or an answer cannot be read
            reason = exc
        self.broken = True
        self._writer.close()
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(ConnectionResetError(f"the link broke: {reason!r}"))

    def close(self) -> None:
        self._reading.cancel()


class PeerServer:
    """Answers the other workers' forwarded calls with this worker's engine, on its serving
    event loop (``start``).

    Calls in ``ON_LOOP``, and the steering half of feedback, run right on the loop's thread, as
    the routes run this worker's own: a thread of their own contended with the loop for the
    GIL, and a forwarded page waited for both (2 workers at 1M, p99 at 200/s: a forwarded
    request 47 ms against 8 ms for one served where it arrived). The rest wait in a thread.
    """

    def __init__(self, shard: Shard, engine: Engine, owners: PeerOwners) -> None:
        self._shard = shard
        self._engine = engine
        self._owners = owners
        self._server: asyncio.Server | None = None
        self._peers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # calls answered from a thread

    async def start(self) -> None:
        """Listen for the other workers on this worker's socket, on the running loop."""
        self._server = await asyncio.start_unix_server(
            self._serve, path=self._shard.address(self._shard.index)
        )

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for writer in list(self._peers):
            writer.close()  # their handlers see the end of the stream and return
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._peers.add(writer)
        try:
            try:
                await asyncio.wait_for(
                    _prove_as_server(reader, writer, self._shard.authkey), HANDSHAKE_TIMEOUT_S
                )
            except (OSError, EOFError, TimeoutError):
                log.warning("a peer connection failed its handshake", exc_info=True)
                return
            while True:
                try:
                    number, method, args, kwargs = await _read_frame(reader)
                except (EOFError, OSError):
                    return
                except Exception:  # noqa: BLE001 - the peer's calls on this link fail (503)
                    log.warning("a peer sent a call that cannot be read", exc_info=True)
                    return
                if self._runs_now(method):  # a page: answered before the next call is read
                    _answer(writer, number, method, self._run_now(method, args, kwargs))
                    await writer.drain()
                else:  # waits on a thread: the link goes on carrying other calls meanwhile
                    task = asyncio.create_task(
                        self._answer_later(writer, number, method, args, kwargs)
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (ConnectionError, OSError):
            return  # the peer went away mid-answer
        finally:
            self._peers.discard(writer)
            writer.close()

    def _runs_now(self, method: str) -> bool:
        return method in ON_LOOP and self._engine.searches_in_process

    def _run_now(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        return self._call(getattr(self._engine, method), args, kwargs)

    async def _answer_later(
        self,
        writer: asyncio.StreamWriter,
        number: int,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        answer = await self._run(method, args, kwargs)
        with contextlib.suppress(ConnectionError, OSError):  # the peer went away meanwhile
            _answer(writer, number, method, answer)
            await writer.drain()

    async def _run(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        """A call that is not run right away (``_runs_now``), where it costs least."""
        if method not in FORWARDED:
            return False, SessionOwnerUnavailableError(f"{method!r} is not forwarded")
        engine = self._engine
        if method == "feedback":  # as the route runs it
            try:
                return True, await feedback_here(engine, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the caller raises it, as if it ran there
                return False, exc
        # Searches encode images; over Milvus a page waits on its server's answer.
        return await run_in_threadpool(self._call, getattr(engine, method), args, kwargs)

    def _call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bool, Any]:
        try:
            with self._owners.answering_a_peer():
                return True, func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the caller raises it, as if it ran there
            return False, exc


def _answer(
    writer: asyncio.StreamWriter, number: int, method: str, answer: tuple[bool, Any]
) -> None:
    try:
        frame = _frame((number, answer))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        # Pickling failed before anything was written: the caller still gets an answer.
        failure = RuntimeError(f"{method} answered what cannot be sent: {exc}")
        frame = _frame((number, (False, failure)))
    writer.write(frame)


@contextlib.asynccontextmanager
async def peering(owners: PeerOwners, server: PeerServer) -> AsyncIterator[None]:
    """While a worker serves: answer the other workers, and forward to them, on its loop."""
    owners.attach(asyncio.get_running_loop())
    await server.start()
    try:
        yield
    finally:
        await server.close()
        await owners.close()


def serve_workers(settings: Settings, socks: list[socket.socket]) -> int:
    """Run ``settings.workers`` worker processes on ``socks`` (``listening_sockets``, which
    they are handed and this process closes) until SIGINT or SIGTERM (or a worker's
    unexpected exit); returns the exit status. The main loop of the ``serve`` process: it
    keeps its signal handlers when it returns."""
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
    server = PeerServer(shard, engine, owners)
    try:
        engine.load()
        serve_engine(settings, engine, sock, around=lambda: peering(owners, server))
    finally:
        engine.close()


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """The listening sockets of ``count`` serving processes: one for a single process; for
    workers, one each where Linux balances connections between sockets bound with
    SO_REUSEPORT (else one socket they all share). Raises OSError (a port in use).

    On a shared socket, the worker that wakes first accepts every connection pending, so the
    few keep-alive connections of a client or a proxy land mostly in one worker (7 or 8 of 8
    in a test), which then parses and forwards every request while the other idles. With a
    socket each, the kernel spreads connections over the workers by a hash of their addresses.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    balanced = count > 1 and sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
    if balanced and port != 0:
        # SO_REUSEPORT would also join a port another server with workers listens on (another
        # catalog, say), taking half its connections: a plain bind first refuses a port in use.
        socket.create_server((host, port), family=family).close()
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
