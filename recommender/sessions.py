"""Per-session state and a bounded, thread-safe, in-process session store."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from indexer.arrays import grown
from recommender.errors import UnknownSessionError
from recommender.explore import PickKind
from recommender.feedback import DwellConfig, DwellStats, SteeringState, new_dwell_stats
from recommender.rerank import LocalVocabulary, VocabularyConfig
from recommender.retrieve import Filters
from recommender.types import Vector

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds from an arbitrary origin, non-decreasing (``time.monotonic`` by default)."""


def new_session_id() -> str:
    """An unguessable session id: 24 random bytes (192 bits), URL-safe base64 (32 chars)."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class SessionConfig:
    """Bounds of the session store and of each session.

    A session idle for more than ``ttl_s`` expires; past ``max_sessions`` the least recently
    used one is evicted. ``max_feedback`` feedback events and ``max_served`` served records
    are kept per session; ``max_event_ids`` processed event ids are remembered for
    idempotency. The seen set itself is never trimmed: it is what keeps the scroll from
    repeating. A session with full steering histories holds roughly 0.25 MB per space at
    d = 384, hence the modest default count.
    """

    ttl_s: float = 3600.0
    max_sessions: int = 1_000
    max_feedback: int = 1_000
    max_served: int = 5_000
    max_event_ids: int = 10_000
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    dwell: DwellConfig = field(default_factory=DwellConfig)

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.max_sessions < 1:
            raise ValueError("need ttl_s > 0 and max_sessions >= 1")


class Served(NamedTuple):
    """One item served to a session: its id and catalog key, how it was picked, its fused
    score, when."""

    image_id: str
    key: int
    pick: PickKind
    score: float
    at: float


class FeedbackEvent(NamedTuple):
    """One accepted feedback event: the item's catalog key (-1 when the catalog does not know
    its id), raw dwell (ms), its normalised score, when it arrived."""

    key: int
    dwell_ms: float
    score: float
    at: float


class Columns:
    """Rows of numbers in growable numpy columns, oldest first, the newest ``limit`` kept.

    Sessions keep a row per item they were served and per feedback event, thousands each. In
    Python containers a full cycle collection walks every entry, a pause for every request
    meanwhile (1,000 sessions shown 2,000 items each: 70 ms a collection with them as plain
    tuples in deques; ``benchmarks/gc_pause.py``); columns are never walked."""

    def __init__(self, limit: int, **dtypes: type[np.generic]) -> None:
        self.limit = max(limit, 1)
        self._columns = {name: np.zeros(0, dtype=dtype) for name, dtype in dtypes.items()}
        self._end = 0  # rows written; the kept ones are the last ``len(self)`` of them

    def __len__(self) -> int:
        return min(self._end, self.limit)

    def append(self, **values: ArrayLike) -> None:
        """Add rows: one equal-length sequence per column."""
        rows = {name: np.asarray(values[name]).reshape(-1) for name in self._columns}
        count = len(next(iter(rows.values())))
        room = max(2 * self.limit, 64)  # rows held at most: the window and as many again
        if self._end + count > room:  # move the window's rows to the front, the rest go
            keep = min(len(self), max(self.limit - count, 0))
            for column in self._columns.values():
                column[:keep] = column[self._end - keep : self._end]
            self._end = keep
        end = self._end + count
        for name, column in self._columns.items():
            if end > len(column):
                size = max(end, min(2 * len(column), room))
                column = self._columns[name] = grown(column, size, fill=0)
            column[self._end : end] = rows[name]
        self._end = end

    def __getitem__(self, name: str) -> NDArray[Any]:
        """A column's kept rows, oldest first, read-only."""
        view = self._columns[name][self._end - len(self) : self._end]
        view.flags.writeable = False
        return view


class KeySet:
    """The catalog keys a session has been shown, in a growable int64 array (a key added twice
    is held twice: harmless to the questions asked of it).

    A Python set of ints costs the cycle collector a visit per key at each full collection,
    a pause for every request meanwhile (``benchmarks/gc_pause.py``)."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._count = 0

    def add(self, key: int) -> None:
        self.update((key,))

    def update(self, keys: Iterable[int]) -> None:
        new = np.fromiter(keys, dtype=np.int64)
        end = self._count + len(new)
        self._keys = grown(self._keys, end, fill=-1, spare=1.0)
        self._keys[self._count : end] = new
        self._count = end

    def array(self) -> NDArray[np.int64]:
        """The keys, read-only (a view: later additions do not show in it)."""
        view = self._keys[: self._count]
        view.flags.writeable = False
        return view

    def contains(self, keys: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which of ``keys`` are in the set."""
        return np.isin(keys, self.array())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int | np.integer) and bool(np.any(self.array() == key))


@dataclass(frozen=True)
class Ranking:
    """A session's re-ranked candidates, best first, and the catalog revision they were
    ranked on. While nothing that ranked them changes (the session's query, vocabulary and
    filters; the catalog), the scroll's next pages take the best unseen of them instead of
    searching and re-ranking again.

    ``scores`` are the fused re-rank scores, ``cosines`` the candidates' cosines to the steered
    query in the primary space, ``near`` which of them lie within the similarity floor of the
    original query; ``complete``: the search found every item that qualifies, so nothing lies
    beyond these; ``sparse``: the sparse signal of the pages taken from them.
    """

    revision: int
    keys: NDArray[np.int64]
    scores: NDArray[np.float32]
    cosines: NDArray[np.float32]
    near: NDArray[np.bool_]
    complete: bool
    sparse: bool

    def __len__(self) -> int:
        return len(self.keys)

    def unseen(self, seen: KeySet) -> Ranking:
        """The candidates not in ``seen``, in the same order."""
        keep = ~seen.contains(self.keys)
        if keep.all():
            return self
        return Ranking(
            self.revision,
            self.keys[keep],
            self.scores[keep],
            self.cosines[keep],
            self.near[keep],
            self.complete,
            self.sparse,
        )


@dataclass(eq=False)
class Session:
    """Everything the recommender knows about one scroll.

    ``q0[space]`` is the original query and ``query[space]`` the steered one (unit float32
    (d,)); ``steering[space]`` the steering state that produced it. ``seen`` is an ordered set
    (dict keys) of every id shown or used as the query. ``lock`` guards the whole session:
    the engine holds it across read-modify-write sequences.
    """

    id: str
    user_id: str | None
    created: float
    last_used: float
    vocabulary: LocalVocabulary
    dwell: DwellStats
    # What it was served (key, explore, score, at) and its feedback events (key, dwell_ms,
    # score, at): the newest ``max_served`` / ``max_feedback`` rows of each.
    served: Columns
    feedback: Columns
    max_event_ids: int = 10_000
    q0: dict[str, Vector] = field(default_factory=dict)
    query: dict[str, Vector] = field(default_factory=dict)
    steering: dict[str, SteeringState] = field(default_factory=dict)
    seen: dict[str, None] = field(default_factory=dict)
    processed_events: dict[str, None] = field(default_factory=dict)
    n_served: int = 0
    n_feedback: int = 0
    # The generation fallback: a job is queued or running for this session; the ids it made
    # that this session has not been shown yet (they lead its next pages); the last failure.
    pending_generation: bool = False
    generated_inbox: deque[str] = field(default_factory=deque)
    generation_error: str | None = None
    # Set by the engine when a query starts the scroll.
    filters: Filters = field(default_factory=Filters)
    primary: str = "visual"
    seen_keys: KeySet = field(default_factory=KeySet)
    # The last search's re-ranked candidates: the next pages come from them while nothing
    # that ranked them changes (the engine drops them on feedback, a mute or a new query).
    ranking: Ranking | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def muted(self) -> frozenset[str]:
        return self.vocabulary.muted

    def is_seen(self, image_id: str) -> bool:
        return image_id in self.seen

    def mark_seen(self, image_ids: Iterable[str]) -> None:
        for image_id in image_ids:
            self.seen.setdefault(image_id, None)

    def record_served(self, items: Iterable[Served]) -> None:
        """Remember served items and mark them seen."""
        served = list(items)
        for item in served:
            self.seen.setdefault(item.image_id, None)
        self.seen_keys.update(item.key for item in served)
        self.served.append(
            key=[item.key for item in served],
            explore=[item.pick == "explore" for item in served],
            score=[item.score for item in served],
            at=[item.at for item in served],
        )
        self.n_served += len(served)

    def accept_event(self, event_id: str) -> bool:
        """True the first time an event id is offered, False for a duplicate (idempotency)."""
        if event_id in self.processed_events:
            return False
        self.processed_events[event_id] = None
        while len(self.processed_events) > self.max_event_ids:
            del self.processed_events[next(iter(self.processed_events))]
        return True

    def record_feedback(self, events: Sequence[FeedbackEvent]) -> None:
        self.feedback.append(
            key=[e.key for e in events],
            dwell_ms=[e.dwell_ms for e in events],
            score=[e.score for e in events],
            at=[e.at for e in events],
        )
        self.n_feedback += len(events)


class SessionOwners(Protocol):
    """Which serving process holds a session, when several serve one catalog
    (``service/workers.py``): a session lives in one process, and its id says which."""

    def owns(self, session_id: str) -> bool:
        """True when this process holds the session with this id."""
        ...

    def new_session_id(self) -> str:
        """A fresh unguessable id that names this process as the owner."""
        ...

    def call(self, session_id: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Run the engine's ``method`` in the process that holds the session; its result, or
        the error it raised. Blocks: for a caller in a thread."""
        ...

    async def forward(self, session_id: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """``call`` for a caller on the serving event loop, awaited without holding a thread."""
        ...

    def home_for_new_session(self) -> int | None:
        """Where the next new session should live: None for this process, else the index of
        another (new sessions are spread over the processes, whichever one a client reached)."""
        ...

    def call_in(self, process: int, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Run the engine's ``method`` in process ``process``, as ``call`` does."""
        ...


class SessionStore:
    """In-process sessions, bounded by idle TTL and by count (least recently used evicted).

    Thread-safe: one lock guards the table (each session has its own lock for its state).
    ``clock`` is injected so that tests control time; ``new_id`` makes session ids.
    """

    def __init__(
        self,
        config: SessionConfig | None = None,
        clock: Clock = time.monotonic,
        new_id: Callable[[], str] = new_session_id,
    ) -> None:
        self.config = config or SessionConfig()
        self._clock = clock
        self._new_id = new_id
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first

    def create(self, user_id: str | None = None) -> Session:
        """A new empty session; may evict expired and least recently used ones."""
        cfg = self.config
        now = self._clock()
        session = Session(
            id=self._new_id(),
            user_id=user_id,
            created=now,
            last_used=now,
            vocabulary=LocalVocabulary(cfg.vocabulary),
            dwell=new_dwell_stats(cfg.dwell),
            served=Columns(
                cfg.max_served, key=np.int64, explore=np.bool_, score=np.float32, at=np.float64
            ),
            feedback=Columns(
                cfg.max_feedback, key=np.int64, dwell_ms=np.float32, score=np.float32, at=np.float64
            ),
            max_event_ids=cfg.max_event_ids,
        )
        with self._lock:
            self._purge(now)
            while len(self._sessions) >= cfg.max_sessions:
                evicted, _ = self._sessions.popitem(last=False)
                log.info("session %s… evicted (max %d sessions)", evicted[:6], cfg.max_sessions)
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        """The live session with this id, marked as just used; else UnknownSessionError."""
        now = self._clock()
        with self._lock:
            session = self._live(session_id, now)
            session.last_used = now
            self._sessions.move_to_end(session_id)
            return session

    def touch(self, session_id: str) -> None:
        """Mark a session as just used (UnknownSessionError if it is not live)."""
        self.get(session_id)

    def delete(self, session_id: str) -> None:
        """Forget a session (UnknownSessionError if it is not live)."""
        with self._lock:
            self._live(session_id, self._clock())
            del self._sessions[session_id]

    def purge_expired(self) -> int:
        """Drop every expired session now; returns how many were dropped."""
        with self._lock:
            return self._purge(self._clock())

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            session = self._sessions.get(session_id) if isinstance(session_id, str) else None
            return session is not None and not self._expired(session, self._clock())

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_used > self.config.ttl_s

    def _live(self, session_id: str, now: float) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(session_id)
        if self._expired(session, now):
            del self._sessions[session_id]
            raise UnknownSessionError(session_id)
        return session

    def _purge(self, now: float) -> int:
        # ordered by last use, so expired sessions are all at the front
        dropped = 0
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if not self._expired(oldest, now):
                break
            self._sessions.popitem(last=False)
            dropped += 1
        return dropped


__all__ = [
    "Clock",
    "FeedbackEvent",
    "Ranking",
    "Served",
    "Session",
    "SessionConfig",
    "SessionOwners",
    "SessionStore",
    "new_session_id",
]
