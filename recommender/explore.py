"""Exploration: one page = the top matches plus a few picks from further down the ranking."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

PickKind = Literal["top", "explore"]


@dataclass(frozen=True)
class ExploreConfig:
    """Page shape: ``n_top`` top matches plus ``n_explore`` picks from ranks
    ``[explore_from, explore_to)`` (0-based) of the ranked candidates.

    ``interleave`` spreads the explore picks evenly through the page instead of appending
    them, so that dwell on them is compared with neighbouring top matches.
    """

    n_top: int = 15
    n_explore: int = 5
    explore_from: int = 15
    explore_to: int = 50
    interleave: bool = True

    def __post_init__(self) -> None:
        if self.n_top < 0 or self.n_explore < 0:
            raise ValueError("n_top and n_explore must be >= 0")
        if not 0 <= self.explore_from <= self.explore_to:
            raise ValueError("need 0 <= explore_from <= explore_to")

    @property
    def page_size(self) -> int:
        return self.n_top + self.n_explore


@dataclass(frozen=True)
class Pick:
    """One page slot: ``rank`` is the 0-based position in the ranked candidate list."""

    rank: int
    kind: PickKind


def make_page(
    n_ranked: int,
    config: ExploreConfig | None,
    rng: np.random.Generator,
    explore_scores: ArrayLike | None = None,
) -> list[Pick]:
    """Choose a page from ``n_ranked`` candidates already sorted best first.

    Top picks are ranks ``0 .. n_top-1`` (as many as exist). Explore picks come from ranks
    ``[max(explore_from, n_top), min(explore_to, n_ranked))``: without ``explore_scores`` they
    are drawn uniformly without replacement from ``rng``; with ``explore_scores`` (float
    (n_ranked,), aligned with the ranking, higher is better, e.g. Thompson samples) the
    best-scoring ranks of that window are taken. Short lists give shorter pages; there are
    never duplicates, and the result is deterministic for a given ``rng`` state.
    """
    cfg = config or ExploreConfig()
    n = max(int(n_ranked), 0)
    top = [Pick(r, "top") for r in range(min(cfg.n_top, n))]
    lo, hi = max(cfg.explore_from, cfg.n_top), min(cfg.explore_to, n)
    window = np.arange(lo, hi, dtype=np.int64) if hi > lo else np.zeros(0, dtype=np.int64)
    k = min(cfg.n_explore, window.size)
    if k == 0:
        return top
    if explore_scores is None:
        chosen = rng.choice(window, size=k, replace=False)
    else:
        scores = np.asarray(explore_scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != n:
            raise ValueError(f"explore_scores has {scores.shape[0]} entries for {n} ranks")
        w = np.where(np.isfinite(scores[window]), scores[window], -np.inf)
        # stable sort: ties go to the better-ranked candidate
        chosen = window[np.argsort(-w, kind="stable")[:k]]
    explore = [Pick(int(r), "explore") for r in sorted(chosen.tolist())]
    return _interleave(top, explore) if cfg.interleave else top + explore


def _interleave(top: list[Pick], explore: list[Pick]) -> list[Pick]:
    """Place explore picks at evenly spaced slots (never first), top picks keep their order."""
    total = len(top) + len(explore)
    slots = {round((i + 1) * total / (len(explore) + 1)) for i in range(len(explore))}
    # rounding can collide for tiny pages; fall back to the last free slots
    free = iter(s for s in range(total - 1, -1, -1) if s not in slots)
    while len(slots) < len(explore):
        slots.add(next(free))
    it_top, it_exp = iter(top), iter(explore)
    return [next(it_exp) if s in slots else next(it_top) for s in range(total)]


__all__ = ["ExploreConfig", "Pick", "PickKind", "make_page"]
