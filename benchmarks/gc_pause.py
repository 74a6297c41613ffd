"""How long a full cycle collection pauses a serving process that holds many deep sessions.

Every request waits while CPython's cycle collector runs, and a full collection walks every
entry of every tracked container. A session keeps, per item it was shown, its key (the seen
keys), a served record and a feedback event. This builds ``--sessions`` sessions that were
each shown ``--shown`` items with feedback on all of them, the way the engine records them
(``recommender.sessions``: numpy arrays), and times ``gc.collect()`` with them alive against
a baseline in the same run: the same sessions keeping those records as they did before (the
keys in a Python set, served records as tuples in a deque, feedback events as objects).

    python benchmarks/gc_pause.py [--sessions 128] [--shown 2000] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recommender.sessions import FeedbackEvent, Served, SessionConfig, SessionStore


@dataclass(frozen=True)
class TrackedEvent:
    """A feedback event as the sessions kept it before: an object the collector tracks."""

    event_id: str
    image_id: str
    dwell_ms: float
    score: float
    at: float


def build_sessions(count: int, shown: int, seed: int) -> SessionStore:
    """``count`` sessions, each shown ``shown`` random items with feedback on every one."""
    rng = np.random.default_rng(seed)
    store = SessionStore(SessionConfig(max_sessions=count, max_feedback=shown, max_served=shown))
    for _ in range(count):
        session = store.create()
        keys = rng.integers(1_000_000, size=shown).tolist()
        session.record_served(Served(f"b{key}", key, "top", 1.0, 0.0) for key in keys)
        session.record_feedback([FeedbackEvent(key, 1500.0, 0.1, 0.0) for key in keys])
    return store


def to_old_layout(store: SessionStore) -> None:
    """Keep each session's records as the sessions did before (in place: the sessions are
    of no further use)."""
    for session in store._sessions.values():  # noqa: SLF001 - a benchmark looks inside
        old: Any = session
        keys = session.served["key"].tolist()
        old.seen_keys = set(keys)
        old.served = deque((f"b{key}", "top", 1.0, 0.0) for key in keys)
        old.feedback = deque(
            TrackedEvent(f"e{n}", f"b{key}", 1500.0, 0.1, 0.0)
            for n, key in enumerate(session.feedback["key"].tolist())
        )


def full_collection_ms(repeats: int = 5) -> float:
    """The fastest of ``repeats`` full collections, ms."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def measure(args: argparse.Namespace) -> dict[str, float]:
    gc.collect()
    gc.freeze()  # what the service does once started: start-up objects are never walked
    empty = full_collection_ms()
    store = build_sessions(args.sessions, args.shown, args.seed)
    now = full_collection_ms()
    to_old_layout(store)
    before = full_collection_ms()
    return {"no_sessions_ms": empty, "now_ms": now, "with_old_layout_ms": before}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=128)
    parser.add_argument("--shown", type=int, default=2000, help="items shown per session")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    figures = measure(args)
    show: Callable[[str], str] = lambda name: f"{figures[name]:.1f} ms"  # noqa: E731
    print(
        f"full collection, {args.sessions} sessions x {args.shown} items shown with feedback: "
        f"{show('now_ms')} (no sessions: {show('no_sessions_ms')}; the same sessions with "
        f"their records kept as before (a set, tuples, objects): "
        f"{show('with_old_layout_ms')})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"settings": vars(args) | {"json": str(args.json)}, "figures": figures}, indent=2
            )
        )


if __name__ == "__main__":
    main()
