"""Sessions: state helpers and the bounded store (TTL, LRU, delete), with an injected clock."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from recommender.errors import UnknownSessionError
from recommender.sessions import Columns, Served, SessionConfig, SessionStore, new_session_id


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_session_ids_are_long_and_unique() -> None:
    ids = {new_session_id() for _ in range(1_000)}
    assert len(ids) == 1_000
    assert all(len(i) == 32 for i in ids)  # 24 random bytes, base64


def test_ttl_expiry() -> None:
    clock = FakeClock()
    store = SessionStore(SessionConfig(ttl_s=60), clock=clock)
    a, b = store.create("u1"), store.create()
    clock.now += 50
    assert store.get(a.id) is a  # touched: its idle time restarts
    clock.now += 50  # b idle 100 s, a idle 50 s
    assert a.id in store and b.id not in store
    with pytest.raises(UnknownSessionError):
        store.get(b.id)
    assert len(store) == 1
    clock.now += 61
    assert len(store) == 0
    with pytest.raises(UnknownSessionError):
        store.touch(a.id)


def test_lru_eviction_at_max_count() -> None:
    clock = FakeClock()
    store = SessionStore(SessionConfig(max_sessions=3), clock=clock)
    s = [store.create() for _ in range(3)]
    clock.now += 1
    store.touch(s[0].id)  # s[1] is now the least recently used
    s.append(store.create())
    assert len(store) == 3
    assert s[1].id not in store
    assert all(x.id in store for x in (s[0], s[2], s[3]))


def test_purge_and_delete() -> None:
    clock = FakeClock()
    store = SessionStore(SessionConfig(ttl_s=10), clock=clock)
    a, b = store.create(), store.create()
    store.delete(a.id)
    assert a.id not in store
    with pytest.raises(UnknownSessionError):
        store.delete(a.id)
    with pytest.raises(UnknownSessionError):
        store.get("no-such-session")
    clock.now += 11
    assert store.purge_expired() == 1
    with pytest.raises(UnknownSessionError):
        store.delete(b.id)


def test_session_state_helpers() -> None:
    store = SessionStore(SessionConfig(max_event_ids=3, max_feedback=2), clock=FakeClock())
    s = store.create("alice")
    assert s.user_id == "alice" and s.created == s.last_used
    s.mark_seen(["q"])
    s.record_served([Served("a", 7, "top", 1.0, 0.0), Served("b", 9, "explore", 0.5, 0.0)])
    assert list(s.seen) == ["q", "a", "b"] and s.is_seen("b") and not s.is_seen("c")
    assert s.n_served == 2 and s.served["key"].tolist() == [7, 9] and 9 in s.seen_keys
    assert s.served["explore"].tolist() == [False, True]
    assert s.accept_event("e1") and not s.accept_event("e1")
    for e in ("e2", "e3", "e4"):
        assert s.accept_event(e)
    assert list(s.processed_events) == ["e2", "e3", "e4"]  # bounded: the oldest forgotten
    s.vocabulary.mute("cat")
    assert s.muted == frozenset({"cat"})
    assert s.pending_generation is False


def test_columns_keep_the_newest_rows_up_to_their_limit() -> None:
    log = Columns(3, key=np.int64, score=np.float32)
    assert len(log) == 0 and log["key"].tolist() == []
    for start in range(0, 200, 2):  # past the room it holds, so the rows move to the front
        log.append(key=[start, start + 1], score=[0.5, 1.5])
        assert log["key"].tolist() == list(range(max(0, start - 1), start + 2))
    log.append(key=range(1000, 1010), score=np.zeros(10))  # a batch longer than the limit
    assert log["key"].tolist() == [1007, 1008, 1009] and len(log) == 3
    with pytest.raises(ValueError):
        log["key"][0] = 5  # read-only


def test_store_is_thread_safe() -> None:
    store = SessionStore(SessionConfig(max_sessions=50))
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(200):
            sid = store.create().id
            with lock:
                ids.append(sid)
            with contextlib.suppress(UnknownSessionError):  # evicted by another thread
                store.touch(sid)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 800 and len(set(ids)) == 800
    assert len(store) == 50
