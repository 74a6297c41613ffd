"""Dwell normalisation and steering strategies, as pure functions on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recommender.errors import UnknownStrategyError
from recommender.explore import ExploreConfig, make_page
from recommender.feedback import (
    STRATEGIES,
    BayesConfig,
    BayesState,
    BayesSteerer,
    DwellConfig,
    NoSteerer,
    RocchioConfig,
    RocchioSteerer,
    Steerer,
    SteeringConfig,
    SumoConfig,
    SumoState,
    SumoSteerer,
    make_steerer,
    new_dwell_stats,
    score_dwell,
)
from recommender.types import as_rows

# --------------------------------------------------------------------------- dwell


def test_fast_skip_is_negative_and_the_lowest_score() -> None:
    cfg = DwellConfig()
    s = score_dwell(new_dwell_stats(cfg), [100, 399, 401, 2_000, 8_000], cfg)
    assert s[0] == s[1] == cfg.skip_score < 0
    assert s[2] >= cfg.skip_score
    assert s.dtype == np.float32


def test_scores_are_monotone_in_dwell_within_a_batch() -> None:
    rng = np.random.default_rng(0)
    stats = new_dwell_stats()
    score_dwell(stats, rng.lognormal(7.5, 1.0, 40))  # some history
    dwell = np.sort(rng.lognormal(7.5, 1.5, 50))
    s = score_dwell(stats, dwell)
    assert np.all(np.diff(s) >= 0)


def test_caps_and_bad_values() -> None:
    cfg = DwellConfig(max_ms=60_000)
    s = score_dwell(new_dwell_stats(cfg), [60_000, 600_000, float("inf"), float("nan"), -5], cfg)
    assert s[0] == s[1]  # capped at 60 s
    assert s[2] == s[3] == s[4] == cfg.skip_score  # non-finite / negative: a skip
    assert np.all(s <= cfg.z_max)


def test_all_equal_dwell_scores_equal_and_near_zero() -> None:
    stats = new_dwell_stats()
    score_dwell(stats, [3_000] * 200)
    s = score_dwell(stats, [3_000] * 5)
    assert np.all(s == s[0]) and abs(float(s[0])) < 0.05  # the prior's pull is all that is left


def test_per_session_scaling_is_robust_to_a_huge_outlier() -> None:
    base = [1_000, 2_000, 3_000, 4_000, 5_000] * 4
    a = score_dwell(new_dwell_stats(), base)
    b = score_dwell(new_dwell_stats(), [*base, 60_000])[:-1]
    assert np.max(np.abs(a - b)) < 0.15


def test_sessions_are_normalised_separately() -> None:
    slow, fast = new_dwell_stats(), new_dwell_stats()
    score_dwell(slow, [8_000] * 30)
    score_dwell(fast, [1_000] * 30)
    # 3 s is short for a slow viewer and long for a fast one
    assert score_dwell(slow, [3_000])[0] < 0 < score_dwell(fast, [3_000])[0]


# --------------------------------------------------------------------------- sumo


def _unit(*v: float) -> np.ndarray:
    x = np.asarray(v, dtype=np.float64)
    return x / np.linalg.norm(x)


def test_sumo_matches_a_hand_computation_in_the_warm_up_regime() -> None:
    lr = 0.1
    steerer = SumoSteerer(SumoConfig(lr=lr))
    q0 = _unit(1, 0, 0)
    state = steerer.init_state(q0)
    x = np.stack([_unit(0, 1, 0), _unit(0, 0, 1), _unit(1, 1, 0)])
    s = np.array([1.0, -0.5, 0.5], dtype=np.float32)
    got = steerer.update(state, x, s)

    b = 1 - math.exp(-1)  # 0.632: at most 3 deltas seen
    assert b == pytest.approx(0.632, abs=1e-3)
    q, m, v = q0.copy(), np.zeros(3), np.zeros(3)
    # pair 1: s=1.0 vs -0.5 -> item 0 selected
    g = 2 * b * (x[0] - x[1])
    m, v = 0.2 * g, 0.2 * g**2
    q = q + lr * m / (np.sqrt(v) + 1e-8)
    q /= np.linalg.norm(q)
    # pair 2: s=-0.5 vs 0.5 -> item 2 selected
    g = 2 * b * (x[2] - x[1])
    m, v = 0.8 * m + 0.2 * g, 0.8 * v + 0.2 * g**2
    q = q + lr * m / (np.sqrt(v) + 1e-8)
    q /= np.linalg.norm(q)
    np.testing.assert_allclose(got, q, atol=1e-6)
    assert isinstance(state, SumoState)
    assert list(state.deltas) == pytest.approx([1.5, 1.0])


def test_sumo_matches_a_hand_computation_in_the_mean_of_16_regime() -> None:
    lr = 0.05
    steerer = SumoSteerer(SumoConfig(lr=lr))
    q0 = _unit(1, 1, 0)
    state = steerer.init_state(q0)
    x = np.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1), _unit(1, 0, 1), _unit(0, 1, 1)])
    s = np.array([0.0, 1.0, -1.0, 0.0, 2.0], dtype=np.float32)
    steerer.update(state, x[:3], s[:3])  # deltas 1, 2
    got = steerer.update(state, x[3:], s[3:])  # pairs (2,3): delta 1; (3,4): delta 2

    q, m, v = q0.copy(), np.zeros(3), np.zeros(3)
    steps = [(1, 0, 1.0), (1, 2, 2.0), (3, 2, 1.0), (4, 3, 2.0)]  # (selected, ignored, delta)
    seen: list[float] = []
    for sel, ign, delta in steps:
        seen.append(delta)
        b = 1 - math.exp(-1) if len(seen) <= 3 else 1 - math.exp(-np.mean(seen[-16:]) * delta)
        g = 2 * b * (x[sel] - x[ign])
        m, v = 0.8 * m + 0.2 * g, 0.8 * v + 0.2 * g**2
        q = q + lr * m / (np.sqrt(v) + 1e-8)
        q /= np.linalg.norm(q)
    # the 4th pair is in the mean regime: b = 1 - exp(-mean(1,2,1,2) * 2) = 1 - e^-3
    assert 1 - math.exp(-np.mean(seen) * 2.0) == pytest.approx(1 - math.exp(-3))
    np.testing.assert_allclose(got, q, atol=1e-6)


def test_sumo_pairs_across_batches_and_skips_ties() -> None:
    steerer = SumoSteerer()
    state = steerer.init_state(_unit(1, 0))
    steerer.update(state, [_unit(0, 1)], [0.5])  # m = 1, no pair yet
    assert isinstance(state, SumoState) and state.n_deltas == 0
    steerer.update(state, [_unit(1, 1)], [0.5])  # a tie with the previous item: skipped
    assert state.n_deltas == 0
    np.testing.assert_allclose(state.query, _unit(1, 0), atol=1e-7)
    steerer.update(state, [_unit(-1, 1)], [-1.0])
    assert state.n_deltas == 1


# --------------------------------------------------------------------------- rocchio


def test_rocchio_formula() -> None:
    cfg = RocchioConfig(alpha=1.0, beta=0.75, gamma=0.15)
    steerer = RocchioSteerer(cfg)
    state = steerer.init_state(_unit(1, 0, 0))
    x = np.stack([_unit(0, 1, 0), _unit(0, 1, 0), _unit(0, 0, 1), _unit(1, 1, 1)])
    q = steerer.update(state, x, [2.0, 1.0, -2.0, 0.0])  # liked, liked, disliked, neutral
    np.testing.assert_allclose(q, _unit(1.0, 0.75, -0.15), atol=1e-6)


# --------------------------------------------------------------------------- all strategies


@pytest.mark.parametrize("name", STRATEGIES)
def test_edge_cases_give_unit_finite_queries(name: str) -> None:
    steerer = make_steerer(SteeringConfig(strategy=name))
    rng = np.random.default_rng(1)
    q0 = as_rows(rng.standard_normal(8))[0]
    state = steerer.init_state(q0)
    steerer.update(state, rng.standard_normal((1, 8)), [1.0])  # m = 1
    steerer.update(state, np.zeros((3, 8)), [1.0, -1.0, 0.0])  # zero vectors
    steerer.update(state, rng.standard_normal((4, 8)), [0.0] * 4)  # all-equal dwell
    q = steerer.update(state, np.zeros((0, 8)), np.zeros(0))  # empty batch
    assert q.dtype == np.float32 and q.shape == (8,)
    assert np.all(np.isfinite(q)) and np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", ["none", "sumo"])
def test_all_equal_dwell_leaves_the_query_alone(name: str) -> None:
    steerer = make_steerer(SteeringConfig(strategy=name))
    rng = np.random.default_rng(2)
    state = steerer.init_state(_unit(1, 2, 3, 4))
    q = steerer.update(state, rng.standard_normal((6, 4)), [0.3] * 6)
    np.testing.assert_allclose(q, _unit(1, 2, 3, 4), atol=1e-6)


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_same_image_dwelt_on_again_and_again_leaves_the_query_alone(name: str) -> None:
    """A client that repeats one image's event (fresh event ids) gives rows with no spread:
    the default steerer's posterior once failed its Cholesky factor here (a 500). Shown only
    one thing, the default steerer learns no direction from it (Rocchio's centroid and
    SUMO's momentum move toward the item, as their rules say)."""
    rng = np.random.default_rng(5)
    steerer = make_steerer(SteeringConfig(strategy=name))
    q0 = as_rows(rng.standard_normal(289))[0]
    state = steerer.init_state(q0)
    item = rng.standard_normal((1, 289))
    steerer.update(state, item, [1.0])
    for batch in (10, 30, 60, 200):
        q = steerer.update(state, np.repeat(item, batch, axis=0), rng.standard_normal(batch))
        assert np.all(np.isfinite(q))
        if name in ("default", "none"):
            assert float(q @ q0) > 0.999
        scores = steerer.explore_scores(state, rng.standard_normal((20, 289)), rng)
        assert scores is None or np.all(np.isfinite(scores))


def test_wrong_sizes_and_unknown_strategy_are_refused() -> None:
    steerer = BayesSteerer()
    state = steerer.init_state(_unit(1, 0))
    with pytest.raises(ValueError):
        steerer.update(state, np.ones((2, 2)), [1.0])
    with pytest.raises(ValueError):
        steerer.update(state, np.ones((1, 3)), [1.0])
    with pytest.raises(ValueError):
        steerer.init_state(np.zeros(2))
    with pytest.raises(UnknownStrategyError, match="sumo"):
        make_steerer(SteeringConfig(strategy="thompson"))


def test_default_strategy_learns_the_liked_direction_and_samples_deterministically() -> None:
    rng = np.random.default_rng(3)
    d = 16
    q0 = as_rows(rng.standard_normal(d))[0]
    liked = as_rows(rng.standard_normal(d))[0]
    steerer = BayesSteerer()
    state = steerer.init_state(q0)
    for _ in range(3):
        x = as_rows(q0 + 0.8 * rng.standard_normal((20, d)))
        steerer.update(state, x, 2.0 * (x @ liked) + 0.1 * rng.standard_normal(20))
    assert float(state.query @ liked) > float(q0 @ liked) + 0.3
    cands = rng.standard_normal((30, d))
    a = steerer.explore_scores(state, cands, np.random.default_rng(7))
    b = steerer.explore_scores(state, cands, np.random.default_rng(7))
    c = steerer.explore_scores(state, cands, np.random.default_rng(8))
    assert a is not None and b is not None and c is not None
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _primal_posterior(state: BayesState, cfg: BayesConfig) -> tuple[np.ndarray, np.ndarray]:
    """The default strategy's posterior mean and covariance from its history, in primal form
    (d x d), with the history's rows and scores as the docstring defines them."""
    x = np.stack(list(state.items)).astype(np.float64)
    s = np.fromiter(state.scores, dtype=np.float64)
    rho = cfg.decay ** np.arange(len(s) - 1, -1, -1)
    xc = x - rho @ x / rho.sum()
    xc /= math.sqrt(rho @ np.sum(xc * xc, axis=1) / rho.sum())
    resid = s - rho @ s / rho.sum()
    m0 = cfg.prior_mean * state.q0.astype(np.float64)
    weights = rho / cfg.noise_std**2  # inverse noise variances
    precision = np.eye(x.shape[1]) / cfg.prior_std**2 + xc.T @ (xc * weights[:, None])
    cov = np.linalg.inv(precision)
    return cov @ (m0 / cfg.prior_std**2 + xc.T @ (resid * weights)), cov


def test_default_strategy_posterior_equals_the_primal_form_as_its_history_rolls() -> None:
    """The update keeps its history's Gram matrix from call to call (adding a batch's rows,
    dropping those past ``history``); its posterior must equal the textbook one computed from
    scratch, through batches that roll the history and one longer than it."""
    rng = np.random.default_rng(11)
    d = 6
    cfg = BayesConfig(history=12)
    steerer = BayesSteerer(cfg)
    q0 = as_rows(rng.standard_normal(d))[0]
    state = steerer.init_state(q0)
    for size in (5, 5, 5, 1, 20, 7, 3):
        x = as_rows(q0 + 0.7 * rng.standard_normal((size, d)))
        steerer.update(state, x, rng.standard_normal(size))
        mean, _ = _primal_posterior(state, cfg)
        np.testing.assert_allclose(state.mean, mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.query, mean / np.linalg.norm(mean), atol=1e-5)
    # Thompson samples are draws from that posterior: their mean and spread match it.
    mean, cov = _primal_posterior(state, cfg)
    draws = np.stack([steerer.sample_preference(state, rng) for _ in range(4000)])
    np.testing.assert_allclose(draws.mean(axis=0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.05)


# --------------------------------------------------------------------------- simulation


def _catalogue(rng: np.random.Generator, n: int = 1500, d: int = 48) -> np.ndarray:
    """Items made of 5 attributes (8 values each) plus noise, like a real embedding's clusters."""
    basis = rng.standard_normal((5, 8, d)) / np.sqrt(d)
    attrs = rng.integers(0, 8, (n, 5))
    x = sum(w * basis[g, attrs[:, g]] for g, w in enumerate([1.0, 0.9, 0.8, 0.7, 0.6]))
    return as_rows(x + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d))


def simulate(
    steerer: Steerer, items: np.ndarray, rng: np.random.Generator, pages: int = 3
) -> tuple[float, float]:
    """One simulated user: a hidden preference w (a far item's direction), dwell =
    exp(4·wᵀx) · log-normal noise with occasional fast skips, pages of 15 + 5 from the 50
    nearest unseen items. Returns (cos(final query, w), mean wᵀx over impressions 31-60)."""
    n = items.shape[0]
    start = int(rng.integers(n))
    far = np.argsort(items @ items[start])[: n // 4]  # preference lies away from the start
    w = items[int(rng.choice(far))]
    state = steerer.init_state(items[start])
    stats = new_dwell_stats()
    seen = np.zeros(n, dtype=bool)
    seen[start] = True
    utility: list[float] = []
    for _ in range(pages):
        sim = np.where(seen, -np.inf, items @ state.query)
        cand = np.argsort(-sim, kind="stable")[:50]
        scores = steerer.explore_scores(state, items[cand], rng)
        shown = cand[[p.rank for p in make_page(cand.size, ExploreConfig(), rng, scores)]]
        seen[shown] = True
        u = items[shown] @ w
        dwell = 2_000 * np.exp(4.0 * u + 0.8 * rng.standard_normal(u.size))
        dwell[rng.random(u.size) < 0.1] = 150.0
        steerer.update(state, items[shown], score_dwell(stats, dwell))
        utility.extend(u.tolist())
    return float(state.query @ w), float(np.mean(utility[30:60]))


def _run(strategy: str, seeds: range) -> np.ndarray:
    out = []
    for seed in seeds:
        items = _catalogue(np.random.default_rng(seed))
        for user in range(15):
            steerer = make_steerer(SteeringConfig(strategy=strategy))
            out.append(simulate(steerer, items, np.random.default_rng([seed, user])))
    return np.asarray(out)


def test_default_strategy_steers_faster_than_sumo() -> None:
    seeds = range(6)  # 90 simulated users; standard error of each difference below ~0.02
    none, sumo, default = (_run(s, seeds).mean(axis=0) for s in ("none", "sumo", "default"))
    # columns: cos(query, hidden preference), mean true utility over impressions 31-60
    assert default[0] > sumo[0] + 0.04
    assert default[1] > sumo[1] + 0.03
    assert sumo[1] > none[1] + 0.1


def test_bayes_defaults_are_the_tuned_ones() -> None:
    # pinned so that a change of defaults is deliberate (re-run the simulation above)
    assert BayesConfig() == BayesConfig(
        prior_mean=0.3, prior_std=0.7, noise_std=1.0, decay=0.99, history=120
    )
    assert isinstance(make_steerer(), BayesSteerer)
    assert isinstance(make_steerer(SteeringConfig(strategy="none")), NoSteerer)


def test_row_cosines_equal_normalised_rows_times_the_direction() -> None:
    from recommender.types import row_cosines

    rng = np.random.default_rng(9)
    x = rng.standard_normal((30, 12)).astype(np.float32) * rng.uniform(0.1, 5, (30, 1))
    x[3] = 0.0  # no vector: scores 0, as a zero row of as_rows does
    x[5, 2] = np.nan  # a non-finite entry counts as 0, as in as_rows
    w = rng.standard_normal(12)
    assert np.allclose(row_cosines(x, w), as_rows(x) @ w, atol=1e-5)
    assert row_cosines(x, w)[3] == 0.0
    with pytest.raises(ValueError, match="width 8"):
        row_cosines(x, w, dim=8)


def test_mean_std_gives_exactly_numpys_mean_and_std() -> None:
    # Exactly, not approximately: pages must rank the same as with v.mean() and v.std().
    from recommender.types import mean_std

    rng = np.random.default_rng(10)
    for n, dtype in [(1, np.float64), (7, np.float32), (100, np.float32), (333, np.float64)]:
        v = (rng.standard_normal(n) * 37.5 + 4.2).astype(dtype)
        assert mean_std(v) == (float(v.mean()), float(v.std()))
