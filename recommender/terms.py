"""The ``terms`` space: an item's tags and prompt terms as a hashed bag of words.

Tags and prompt terms name what is in an image far more directly than an embedding does, and a
person's taste is often a few of them ("red", "portrait", "watercolor"). Steering a linear
preference over this space learns such a taste from a handful of dwell times. It has no FAISS
index: it scores the candidates retrieved in the embedding spaces. Each term counts once, and
so does each of its words, so that "blue background" is close to "blue" but not the same.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from indexer.prompts import item_terms, prompt_terms
from recommender.types import Vector

TERM_SPACE = "terms"
TERM_DIM = 1024  # hashed: collisions among a catalog's few thousand terms are rare and harmless


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


@functools.lru_cache(maxsize=1 << 15)
def _slots(terms: tuple[str, ...]) -> tuple[int, ...]:
    """An item's distinct slots: its terms' features hashed (cached too: successive pages
    share most candidates)."""
    # A tuple of ints, unlike a list, leaves Python's cycle collector: a full collection scans
    # every tracked object, and a serving process holds tens of thousands of these.
    return tuple(sorted({slot for term in terms for slot in _term_slots(term)}))


def term_vector(tags: Iterable[str], prompt: str | None) -> Vector:
    """Unit (TERM_DIM,) float32 bag of the features of ``tags`` and ``prompt``; zero when
    they have none."""
    return term_matrix([item_terms(tags, prompt_terms(prompt))])[0]


def term_matrix(items: Sequence[tuple[str, ...]]) -> NDArray[np.float32]:
    """Unit rows (n, TERM_DIM) for items' terms (``item_terms``, e.g. a catalog item's
    ``terms``); a row without features is zero."""
    slots = [_slots(terms) for terms in items]
    counts = np.fromiter(map(len, slots), np.int64, len(slots))
    cols = np.fromiter((c for row in slots for c in row), np.int64, int(counts.sum()))
    out = np.zeros((len(items), TERM_DIM), dtype=np.float32)
    weights = 1.0 / np.sqrt(np.maximum(counts, 1))
    out[np.repeat(np.arange(len(items)), counts), cols] = np.repeat(weights, counts)
    return out
