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
from itertools import chain

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


def term_vector(tags: Iterable[str], prompt: str | None) -> Vector:
    """Unit (TERM_DIM,) float32 bag of the features of ``tags`` and ``prompt``; zero when
    they have none."""
    return term_matrix([item_terms(tags, prompt_terms(prompt))])[0]


def term_matrix(items: Sequence[tuple[str, ...]]) -> NDArray[np.float32]:
    """Unit rows (n, TERM_DIM) for items' terms (``item_terms``, e.g. a catalog item's
    ``terms``); a row without features is zero."""
    # All the items' terms in one flat run, each term's slots looked up once: no Python loop
    # per item, and no per-item cache (most candidates of a page are new to the process).
    terms_per_item = np.fromiter(map(len, items), np.int64, len(items))
    slots = list(map(_term_slots, chain.from_iterable(items)))
    slots_per_term = np.fromiter(map(len, slots), np.int64, len(slots))
    cols = np.fromiter(chain.from_iterable(slots), np.int64, int(slots_per_term.sum()))
    rows = np.repeat(np.repeat(np.arange(len(items)), terms_per_item), slots_per_term)
    out = np.zeros((len(items), TERM_DIM), dtype=np.float32)
    # A slot two terms share (the word "red" of "red" and "red hair") is set once.
    out[rows, cols] = 1.0
    out /= np.maximum(np.sqrt(out.sum(axis=1, keepdims=True)), 1.0)  # rows of 0 and 1
    return out
