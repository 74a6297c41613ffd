"""Re-ranking: fuse image similarity with prompt and tag similarity to a local vocabulary.

The local vocabulary of a session is a weighted set of prompt vectors (``text`` space) and a
weighted bag of terms (tags and salient prompt words): first the query's own prompt and
tags, then those of the images the person dwelt on, weighted by dwell.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from indexer.prompts import FILLER_PHRASES, STOPWORDS, normalise_term, prompt_terms
from indexer.term_column import TermRuns
from recommender.types import Indices, Scores, Vector, as_rows, mean_std, row_cosines

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class VocabularyConfig:
    """Bounds and weights of a ``LocalVocabulary``.

    ``decay``: factor applied by ``decay()`` (the engine calls it once per feedback batch).
    ``max_muted``: muted terms kept; muting one more lets the one muted longest ago back.
    ``tag_weight`` / ``term_weight``: multipliers for curated tags and for words mined from
    prompts. Entries whose weight falls below ``min_weight`` are dropped.
    """

    max_prompts: int = 32
    max_terms: int = 256
    max_muted: int = 256  # bounds what a client can make a session hold by muting
    decay: float = 0.85
    tag_weight: float = 1.0
    term_weight: float = 0.5
    min_weight: float = 1e-3

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.max_terms < 1 or self.max_muted < 1:
            raise ValueError("max_prompts, max_terms and max_muted must be >= 1")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")


class LocalVocabulary:
    """A session's weighted prompt vectors and weighted terms, bounded in size.

    Not thread-safe on its own: the session's lock guards it. Muted terms are dropped and
    never re-added until ``unmute``.
    """

    def __init__(self, config: VocabularyConfig | None = None) -> None:
        self.config = config or VocabularyConfig()
        self._prompts: list[tuple[NDArray[np.float64], float]] = []
        self._terms: dict[str, float] = {}
        self._muted: dict[str, None] = {}  # in the order they were muted

    def add(
        self,
        prompt_vec: ArrayLike | None,
        tags: Iterable[str] = (),
        terms: Iterable[str] = (),
        weight: float = 1.0,
    ) -> None:
        """Add one image's (or the query's) prompt vector (d,), tags and prompt terms.

        ``weight`` > 0 (e.g. the positive part of a dwell score); other weights are ignored.
        A zero or missing prompt vector adds only the terms.
        """
        if not (weight > 0 and np.isfinite(weight)):
            return
        if prompt_vec is not None:
            v = as_rows(np.asarray(prompt_vec))[0]
            if np.any(v):
                self._prompts.append((v, float(weight)))
                self._bound_prompts()
        cfg = self.config
        bump: dict[str, float] = {}
        for raw, w in [(t, cfg.term_weight) for t in terms] + [(t, cfg.tag_weight) for t in tags]:
            term = normalise_term(raw)
            if term and term not in self._muted:
                bump[term] = max(bump.get(term, 0.0), w * weight)
        for term, w in bump.items():
            self._terms[term] = self._terms.get(term, 0.0) + w
        self._bound_terms()

    def decay(self, factor: float | None = None) -> None:
        """Multiply every weight by ``factor`` (default: the config's) and drop tiny entries."""
        f = self.config.decay if factor is None else float(factor)
        self._prompts = [(v, w * f) for v, w in self._prompts if w * f >= self.config.min_weight]
        self._terms = {t: w * f for t, w in self._terms.items() if w * f >= self.config.min_weight}

    def mute(self, term: str) -> None:
        """Stop ``term`` pulling the feed: drop its weight and refuse it from now on."""
        t = normalise_term(term)
        if t:
            self._muted.pop(t, None)
            self._muted[t] = None
            while len(self._muted) > self.config.max_muted:
                del self._muted[next(iter(self._muted))]
            self._terms.pop(t, None)

    def unmute(self, term: str) -> None:
        self._muted.pop(normalise_term(term), None)

    @property
    def muted(self) -> frozenset[str]:
        return frozenset(self._muted)

    def is_empty(self) -> bool:
        return not self._prompts and not self._terms

    def top_terms(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` heaviest unmuted terms as ``(term, weight)``, heaviest first, ties by name."""
        ranked = sorted(self._terms.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(t, float(w)) for t, w in ranked[: max(n, 0)]]

    def term_weights(self) -> dict[str, float]:
        """A copy of the unmuted term weights."""
        return dict(self._terms)

    def prompt_centroid(self) -> Vector | None:
        """Weighted mean (d,) float32 of the unit prompt vectors, not re-normalised; None if
        there are none."""
        if not self._prompts:
            return None
        vecs = np.stack([v for v, _ in self._prompts])
        w = np.array([w for _, w in self._prompts])
        return (w @ vecs / w.sum()).astype(np.float32)

    def _bound_prompts(self) -> None:
        while len(self._prompts) > self.config.max_prompts:
            # lightest goes; among equals the oldest (lowest index) goes
            idx = min(range(len(self._prompts)), key=lambda i: (self._prompts[i][1], i))
            self._prompts.pop(idx)

    def _bound_terms(self) -> None:
        extra = len(self._terms) - self.config.max_terms
        if extra > 0:
            for term, _ in sorted(self._terms.items(), key=lambda kv: (kv[1], kv[0]))[:extra]:
                del self._terms[term]


# --------------------------------------------------------------------------- fusion


@dataclass(frozen=True)
class RerankWeights:
    """Relative weights of the signals; renormalised over the signals available.

    ``image``: how well the candidate matches the steered query (the engine passes the mean of
    its z-scored cosines in the primary and prompt spaces). ``prompt``: candidate prompt vs the
    vocabulary's prompt centroid (``text`` space). ``tags``: candidate terms vs the
    vocabulary's term weights. ``clip``: cosine in the ``clip`` space, when it exists.
    """

    image: float = 0.5
    prompt: float = 0.2
    tags: float = 0.15
    clip: float = 0.15

    def __post_init__(self) -> None:
        if min(self.image, self.prompt, self.tags, self.clip) < 0:
            raise ValueError("rerank weights must be >= 0")


@dataclass(frozen=True)
class RerankConfig:
    """Fusion: each signal is standardised over the candidates (z-score with std floor
    ``min_std``, clipped to ±``z_clip``) so that weights mean relative influence whatever the
    spaces' cosine ranges; a candidate missing a signal gets its mean (z = 0). Candidates
    carrying a muted term lose ``muted_penalty`` (in z units)."""

    weights: RerankWeights = field(default_factory=RerankWeights)
    min_std: float = 0.02
    z_clip: float = 3.0
    muted_penalty: float = 0.5


@dataclass(frozen=True)
class RerankResult:
    """``scores``: fused float32 (N,), higher is better. ``order``: int64 (N,) candidate
    positions best first (stable: ties keep input order). ``signals``: the signals used."""

    scores: Scores
    order: Indices
    signals: tuple[str, ...]


def rerank(
    image_sim: ArrayLike,
    vocabulary: LocalVocabulary | None = None,
    text_vecs: ArrayLike | None = None,
    terms: TermRuns | Sequence[Sequence[str]] | None = None,
    clip_sim: ArrayLike | None = None,
    config: RerankConfig | None = None,
) -> RerankResult:
    """Fuse the signals of N candidates into one score and an order.

    ``image_sim``: float (N,) cosine to the query in the primary space (NaN = missing).
    ``text_vecs``: float (N, d) prompt embeddings (``text`` space); a zero row = no prompt.
    ``terms``: per candidate, its distinct normalised terms (``item_terms``), as a catalog's
    ``TermRuns`` or as tuples; empty = none.
    ``clip_sim``: float (N,) cosine in the ``clip`` space (NaN = missing), or None.
    Without a vocabulary (or one with no prompts / terms) those signals drop out and the
    weights renormalise over what remains, so image similarity dominates.
    """
    cfg = config or RerankConfig()
    wts = cfg.weights
    img = np.asarray(image_sim, dtype=np.float64).reshape(-1)
    n = img.shape[0]
    runs = None if terms is None else terms if isinstance(terms, TermRuns) else TermRuns.of(terms)
    if runs is not None and len(runs) != n:
        raise ValueError(f"terms has {len(runs)} entries for {n} candidates")
    signals: list[tuple[str, float, NDArray[np.float64]]] = [("image", wts.image, img)]
    if vocabulary is not None and text_vecs is not None:
        prompt = _prompt_similarity(vocabulary, text_vecs, n)
        if prompt is not None:
            signals.append(("prompt", wts.prompt, prompt))
    if vocabulary is not None and runs is not None:
        tag = _tag_similarity(vocabulary.term_weights(), runs)
        if tag is not None:
            signals.append(("tags", wts.tags, tag))
    if clip_sim is not None:
        clip = np.asarray(clip_sim, dtype=np.float64).reshape(-1)
        if clip.shape[0] != n:
            raise ValueError(f"clip_sim has {clip.shape[0]} entries for {n} candidates")
        signals.append(("clip", wts.clip, clip))
    used = [(name, w, v) for name, w, v in signals if w > 0 and np.isfinite(v).any()]
    fused = np.zeros(n, dtype=np.float64)
    total = sum(w for _, w, _ in used)
    for _, w, v in used:
        fused += (w / total) * _standardise(v, cfg)
    if runs is not None and vocabulary is not None and vocabulary.muted and cfg.muted_penalty:
        muted = vocabulary.muted
        fused -= cfg.muted_penalty * (_per_item(runs, lambda name: name in muted) > 0)
    order = np.argsort(-fused, kind="stable").astype(np.int64)
    return RerankResult(fused.astype(np.float32), order, tuple(name for name, _, _ in used))


def _standardise(v: NDArray[np.float64], cfg: RerankConfig) -> NDArray[np.float64]:
    ok = np.isfinite(v)
    mean, std = mean_std(v[ok])
    z = (v - mean) / max(std, cfg.min_std)
    return np.where(ok, np.clip(z, -cfg.z_clip, cfg.z_clip), 0.0)


def _prompt_similarity(
    vocabulary: LocalVocabulary, text_vecs: ArrayLike, n: int
) -> NDArray[np.float64] | None:
    """Cosine-weighted mean of each candidate prompt against the vocabulary; NaN if none."""
    centroid = vocabulary.prompt_centroid()
    if centroid is None:
        return None
    t = np.asarray(text_vecs)
    if t.ndim == 2 and t.shape[0] != n:
        raise ValueError(f"text_vecs has {t.shape[0]} rows for {n} candidates")
    sim = row_cosines(t, centroid, dim=centroid.shape[0])
    return np.where(np.any(np.isfinite(t) & (t != 0), axis=1), sim, np.nan)


def _tag_similarity(weights: dict[str, float], runs: TermRuns) -> NDArray[np.float64] | None:
    """Cosine between each candidate's binary term set and the vocabulary's term weights."""
    norm = float(np.sqrt(sum(w * w for w in weights.values())))
    if norm == 0:
        return None
    sums = _per_item(runs, lambda name: weights.get(name, 0.0))
    counts = runs.counts
    return np.where(counts > 0, sums / (np.sqrt(np.maximum(counts, 1)) * norm), np.nan)


def _per_item(runs: TermRuns, value: Callable[[str], float]) -> NDArray[np.float64]:
    """Each item's sum of ``value`` over its terms, worked out once per distinct term."""
    distinct, which = np.unique(runs.numbers, return_inverse=True)
    per_term = np.fromiter(map(value, runs.names(distinct.tolist())), np.float64, len(distinct))
    item_of = np.repeat(np.arange(len(runs)), runs.counts)
    sums = np.bincount(item_of, weights=per_term[which], minlength=len(runs))
    return sums.astype(np.float64, copy=False)


__all__ = [
    "FILLER_PHRASES",
    "STOPWORDS",
    "LocalVocabulary",
    "RerankConfig",
    "RerankResult",
    "RerankWeights",
    "VocabularyConfig",
    "normalise_term",
    "prompt_terms",
    "rerank",
]
