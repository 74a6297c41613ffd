"""The ``terms`` space: an item's tags and prompt terms as a hashed bag of words.

Tags and prompt terms name what is in an image far more directly than an embedding does, and a
person's taste is often a few of them ("red", "portrait", "watercolor"). Steering a linear
preference over this space learns such a taste from a handful of dwell times. It has no FAISS
index: it scores the candidates retrieved in the embedding spaces. Each term counts once, and
so does each of its words, so that "blue background" is close to "blue" but not the same.
"""

from __future__ import annotations

import functools
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from itertools import chain

import numpy as np
from numpy.typing import NDArray

from indexer.arrays import grown
from indexer.prompts import item_terms, prompt_terms
from indexer.term_column import TermRuns
from recommender.types import Vector

TERM_SPACE = "terms"
TERM_DIM = 1024  # hashed: collisions among a catalog's few thousand terms are rare and harmless
_EXACT_POSITIONS = 1 << 24  # float32 holds positions exactly below this (see ``term_matrix``)


def _term_features(term: str) -> frozenset[str]:
    return frozenset({term, *term.split()})


def term_features(tags: Iterable[str], prompt: str | None) -> frozenset[str]:
    """The features of an item: its normalised tags and prompt terms, and their words."""
    terms = item_terms(tags, prompt_terms(prompt))
    return frozenset(f for term in terms for f in _term_features(term))


@functools.lru_cache(maxsize=1 << 17)
def _term_slots(term: str) -> tuple[int, ...]:
    """Hashed slots of one term's features (cached: a catalog's vocabulary is small next to
    its item count, so new items mostly reuse known terms)."""
    return tuple(zlib.crc32(f.encode()) % TERM_DIM for f in _term_features(term))


class _SlotTable:
    """The hashed slots of a vocabulary's terms by term number, worked out the first time a
    number is met: a page then gathers its ~1,000 term occurrences' slots with numpy, where
    looking each occurrence up by name in Python cost ~0.6 us."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.starts = np.full(0, -1, dtype=np.int64)  # number -> first slot (-1: not met)
        self.counts = np.zeros(0, dtype=np.int64)
        self.slots = np.zeros(1024, dtype=np.int64)
        self.used = 0

    def lookup(
        self, numbers: NDArray[np.int64], names: Callable[[list[int]], list[str]]
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """Where each of ``numbers`` has its slots: starts, counts, and the slots."""
        with self._lock:
            if len(numbers) and int(numbers.max()) >= len(self.starts):
                self.starts = grown(self.starts, int(numbers.max()) + 1, fill=-1, spare=1.0)
                self.counts = grown(self.counts, len(self.starts), fill=0)
            new = numbers[self.starts[numbers] < 0]
            if len(new):
                new = np.unique(new)
                found = [_term_slots(name) for name in names(new.tolist())]
                counts = np.fromiter(map(len, found), np.int64, len(found))
                end = self.used + int(counts.sum())
                self.slots = grown(self.slots, end, fill=0, spare=1.0)
                flat = np.fromiter(chain.from_iterable(found), np.int64, end - self.used)
                self.slots[self.used : end] = flat
                self.starts[new] = self.used + np.cumsum(counts) - counts
                self.counts[new] = counts
                self.used = end
            return self.starts[numbers], self.counts[numbers], self.slots


# One table per vocabulary that numbers its terms for good (a catalog's term column).
_SLOT_TABLES: weakref.WeakKeyDictionary[object, _SlotTable] = weakref.WeakKeyDictionary()


def term_vector(tags: Iterable[str], prompt: str | None) -> Vector:
    """Unit (TERM_DIM,) float32 bag of the features of ``tags`` and ``prompt``; zero when
    they have none."""
    return term_matrix([item_terms(tags, prompt_terms(prompt))])[0]


def term_matrix(items: TermRuns | Sequence[tuple[str, ...]]) -> NDArray[np.float32]:
    """Unit rows (n, TERM_DIM) for items' terms (``item_terms``: a catalog's ``TermRuns``, or
    tuples of them); a row without features is zero."""
    runs = items if isinstance(items, TermRuns) else TermRuns.of(items)
    n = len(runs)
    # Every occurrence's slots gathered from the table: no Python per term.
    if runs.vocabulary is None:
        table = _SlotTable()
    else:
        table = _SLOT_TABLES.get(runs.vocabulary) or _SLOT_TABLES.setdefault(
            runs.vocabulary, _SlotTable()
        )
    starts, counts, slots = table.lookup(runs.numbers, runs.names)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = slots[np.repeat(starts, counts) + within]
    rows = np.repeat(np.repeat(np.arange(n), runs.counts), counts)
    # A slot two terms share (the "red" of "red", "red hair") counts once: of the writes to
    # one cell, whichever lands last is the only one to read its own position back.
    out = np.zeros((n, TERM_DIM), dtype=np.float32)
    if len(rows) < _EXACT_POSITIONS:
        position = np.arange(len(rows), dtype=np.float32)
        out[rows, cols] = position
        winners = rows[out[rows, cols] == position]
    else:  # one row per distinct cell, by sorting them
        winners = np.unique(rows * TERM_DIM + cols) // TERM_DIM
    per_row = np.bincount(winners, minlength=n)
    out[rows, cols] = (1.0 / np.sqrt(np.maximum(per_row, 1)))[rows]
    return out
