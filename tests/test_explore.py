"""Page composition: 15 top matches + 5 exploration picks from ranks 15-50."""

from __future__ import annotations

import numpy as np
import pytest

from recommender.explore import ExploreConfig, Pick, make_page


def _ranks(page: list[Pick], kind: str) -> list[int]:
    return [p.rank for p in page if p.kind == kind]


def test_default_page_is_15_top_plus_5_explore_from_ranks_15_to_50() -> None:
    page = make_page(100, ExploreConfig(), np.random.default_rng(0))
    assert len(page) == 20
    assert _ranks(page, "top") == list(range(15))
    explore = _ranks(page, "explore")
    assert len(explore) == 5 and all(15 <= r < 50 for r in explore)
    assert len({p.rank for p in page}) == 20


def test_explore_picks_stay_in_the_window_and_cover_it() -> None:
    hits: set[int] = set()
    for seed in range(300):
        explore = _ranks(make_page(100, None, np.random.default_rng(seed)), "explore")
        assert all(15 <= r < 50 for r in explore)
        hits.update(explore)
    assert hits == set(range(15, 50))


def test_deterministic_under_a_seed() -> None:
    a = make_page(100, None, np.random.default_rng(42))
    b = make_page(100, None, np.random.default_rng(42))
    c = make_page(100, None, np.random.default_rng(43))
    assert a == b
    assert _ranks(a, "explore") != _ranks(c, "explore")


@pytest.mark.parametrize(
    ("n", "n_top", "n_explore"),
    [(0, 0, 0), (1, 1, 0), (10, 10, 0), (15, 15, 0), (18, 15, 3), (20, 15, 5), (49, 15, 5)],
)
def test_short_lists_fill_what_exists(n: int, n_top: int, n_explore: int) -> None:
    page = make_page(n, None, np.random.default_rng(0))
    assert len(_ranks(page, "top")) == n_top
    assert len(_ranks(page, "explore")) == n_explore
    assert len({p.rank for p in page}) == len(page)
    assert all(0 <= p.rank < n for p in page)


def test_scores_choose_the_best_explore_ranks() -> None:
    scores = np.zeros(60)
    scores[[0, 5, 55]] = 100.0  # outside the window: ignored
    scores[[40, 20, 33, 16, 49, 30]] = [6, 5, 4, 3, 2, 1]
    page = make_page(60, None, np.random.default_rng(0), explore_scores=scores)
    assert _ranks(page, "explore") == [16, 20, 33, 40, 49]
    with pytest.raises(ValueError):
        make_page(60, None, np.random.default_rng(0), explore_scores=np.zeros(10))


def test_interleaving() -> None:
    cfg = ExploreConfig(interleave=True)
    page = make_page(100, cfg, np.random.default_rng(0))
    slots = [i for i, p in enumerate(page) if p.kind == "explore"]
    assert slots == [3, 7, 10, 13, 17]
    flat = make_page(100, ExploreConfig(interleave=False), np.random.default_rng(0))
    assert [p.kind for p in flat] == ["top"] * 15 + ["explore"] * 5
    assert sorted(p.rank for p in flat) == sorted(p.rank for p in page)


def test_custom_counts_and_bad_configs() -> None:
    cfg = ExploreConfig(n_top=3, n_explore=2, explore_from=5, explore_to=8)
    page = make_page(100, cfg, np.random.default_rng(1))
    assert _ranks(page, "top") == [0, 1, 2]
    assert all(5 <= r < 8 for r in _ranks(page, "explore"))
    with pytest.raises(ValueError):
        ExploreConfig(n_top=-1)
    with pytest.raises(ValueError):
        ExploreConfig(explore_from=50, explore_to=15)
