"""Collaborative taste: does a known user's warm start help early in a session, and how long
does the fit take at 10k users x 100k items?

**Warm start.** Simulated users fall into taste clusters: a cluster likes two attribute values
of the sample dump's ground truth (e.g. ``color=blue`` and ``texture=stripes``); a user takes
their cluster's values, with probability ``--variation`` one of them swapped for another value
of the same attribute. Utility and dwell follow ``benchmarks/steering.py`` (fraction of liked
values; log-normal dwell with skips and distracted views). History: each established user
scrolled ``--history`` past sessions of 60 impressions through the engine (default steering,
no taste), each from a random image, in sessions carrying their ``user_id``, so the dwell lands
in the catalog as it would in production; ``--newcomers`` users left only ``--few`` events.
``lookalike taste fit``'s code then fits the model from the catalog. Evaluation: every user
starts a new session from a random image (not their history's) and scrolls 60 impressions,
once per arm, with the same start and noise draws (paired): ``cold`` (no taste, the baseline,
measured in the same run), ``warm`` (taste blended into the first query, newcomers borrowing
from similar users) and ``warm, no borrowing``. Reported: mean utility over impressions 1-10,
11-30, 31-60 (95 % CI over users), the paired warm/cold ratio over 1-10 (bootstrap CI), and
the mean visual cosine of impressions 1-10 to the start image (what the warm start costs the
query itself).

**Fit time.** A synthetic catalog of ``--fit-items`` items (two 384-d spaces, like the offline
profile's visual and text; items drawn around 200 centres) and ``--fit-users`` users in 50
taste clusters with ``--fit-events`` events each; timed: events -> sparse matrices, the
principal basis and projection, and the ALS sweeps; and how many users' factors point to their
own cluster (a check that the defaults hold at that scale).

    python benchmarks/taste.py --users 160 --newcomers 40 --seed 0 --json OUT.json
    python benchmarks/taste.py --skip-fit-time --seed 2 --blend 0.3   # tuning, not reported

The sample dump and its offline catalog are shared with the steering benchmark (built once
under ``benchmarks/out/``); each run works on a scratch copy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the offline profile never needs the network
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.steering import (  # noqa: E402
    IMPRESSIONS,
    OUT_DIR,
    PAGE,
    TASTE_KEYS,
    WINDOWS,
    User,
    UserModel,
    dwell_ms,
    ensure_catalog,
    load_truth,
    mean_ci,
    paired_ratio,
    utility,
    window_means,
)
from indexer.build import open_for_indexing  # noqa: E402
from indexer.catalog import Catalog  # noqa: E402
from recommender.alignment import peak_rss_mb  # noqa: E402
from recommender.api import FeedbackEvent, ItemQuery  # noqa: E402
from recommender.engine import Engine  # noqa: E402
from recommender.taste import (  # noqa: E402
    TasteConfig,
    TasteStore,
    describe_taste,
    fit_als,
    fit_basis,
    fit_taste,
    interactions,
)

log = logging.getLogger("benchmarks.taste")

ARMS = ("cold", "warm", "warm, no borrowing")


@dataclass(frozen=True)
class Member:
    """A simulated user: their ``User`` (liked values, eval start, noise), cluster, history."""

    user: User
    cluster: int
    newcomer: bool
    history: tuple[User, ...]  # one per past session: its own start image and noise

    @property
    def user_id(self) -> str:
        return f"user-{self.user.index}"


# --------------------------------------------------------------------------- population


def make_population(
    args: argparse.Namespace,
    ids: Sequence[str],
    truth: dict[str, dict[str, Any]],
    model: UserModel,
) -> list[Member]:
    rng = np.random.default_rng([args.seed, 31])
    vocab = {key: sorted({str(row[key]) for row in truth.values()}) for key in TASTE_KEYS}
    clusters = []
    for _ in range(args.clusters):
        keys = rng.choice(TASTE_KEYS, size=model.liked, replace=False)
        clusters.append({str(k): str(rng.choice(vocab[str(k)])) for k in keys})
    members = []
    for index in range(args.users + args.newcomers):
        cluster = index % args.clusters
        liked = dict(clusters[cluster])
        if rng.random() < args.variation:
            key = str(rng.choice(list(liked)))
            liked[key] = str(rng.choice(vocab[key]))
        newcomer = index >= args.users
        sessions = 1 if newcomer else args.history
        past = tuple(_session_user(index, liked, ids, model, rng) for _ in range(sessions))
        now = _session_user(index, liked, ids, model, rng)
        members.append(Member(now, cluster, newcomer, past))
    return members


def _session_user(
    index: int, liked: dict[str, str], ids: Sequence[str], model: UserModel, rng: Any
) -> User:
    """One session's draws for a user: a random start image, base speed and noise."""
    base = model.base_ms * math.exp(model.base_spread * float(rng.standard_normal()))
    z = rng.standard_normal(IMPRESSIONS)
    override = np.full(IMPRESSIONS, np.nan)
    roll = rng.random(IMPRESSIONS)
    skip = roll < model.skip_p
    distracted = (roll >= model.skip_p) & (roll < model.skip_p + model.distracted_p)
    override[skip] = rng.uniform(model.skip_min_ms, model.skip_max_ms, int(skip.sum()))
    override[distracted] = rng.uniform(
        model.distracted_min_ms, model.distracted_max_ms, int(distracted.sum())
    )
    start = str(ids[int(rng.integers(len(ids)))])
    return User(index, liked, start, base, z, override)


def run_session(
    engine: Engine,
    user: User,
    user_id: str,
    truth: dict[str, dict[str, Any]],
    model: UserModel,
    run: str,
    impressions: int = IMPRESSIONS,
    shown: list[str] | None = None,
) -> list[float]:
    """One scroll of a known user; returns the true utility of each impression (and appends
    the ids shown to ``shown``)."""
    session_id = engine.create_session(user_id)
    page = engine.search(ItemQuery(user.start_id), session_id=session_id, limit=PAGE)
    out: list[float] = []
    while True:
        events = []
        for item in page.items:
            slot = len(out)
            if slot >= impressions:
                break
            u = utility(user, truth[item.id])
            out.append(u)
            if shown is not None:
                shown.append(item.id)
            matches = round(u * len(user.liked))
            events.append(
                FeedbackEvent(f"{run}-{slot}", item.id, dwell_ms(user, slot, matches, model))
            )
        engine.feedback(session_id, events)
        if len(out) >= impressions or not page.items:
            engine.delete_session(session_id)
            return out
        page = engine.feed(session_id, limit=PAGE)


# --------------------------------------------------------------------------- warm start


def warm_start_benchmark(args: argparse.Namespace, config: TasteConfig) -> dict[str, Any]:
    model = UserModel()
    dump_dir, cached = ensure_catalog(args.count, args.seed, args.out_dir)
    truth = load_truth(dump_dir)
    with tempfile.TemporaryDirectory(prefix="lookalike-taste-") as scratch:
        catalog_dir = Path(scratch) / "catalog"
        shutil.copytree(cached, catalog_dir)
        _, encoders = open_for_indexing(
            catalog_dir, profile=None, overrides={}, device=None, dtype="fp32"
        )
        with Catalog.open(catalog_dir) as catalog:
            ids = sorted(item.id for item in catalog.iter_items())
            members = make_population(args, ids, truth, model)
            nonce = uuid.uuid4().hex[:8]
            started = time.perf_counter()
            history = Engine(catalog, encoders, seed=args.seed)
            for m in members:
                for h, past in enumerate(m.history):
                    length = args.few if m.newcomer else IMPRESSIONS
                    run = f"{nonce}-h{h}-{m.user.index}"  # event ids are unique per catalog
                    run_session(history, past, m.user_id, truth, model, run, length)
            history_s = time.perf_counter() - started
            log.info("history: %d users in %.1f s", len(members), history_s)

            started = time.perf_counter()
            fitted = fit_taste(catalog, config, text_encoder=encoders.get("text"))
            fit_s = time.perf_counter() - started
            no_borrow = replace(fitted, config=replace(config, min_events=0))
            stores = {
                "cold": None,
                "warm": TasteStore(model=fitted),
                "warm, no borrowing": TasteStore(model=no_borrow),
            }
            raw: dict[str, NDArray[np.float64]] = {}
            adherence: dict[str, NDArray[np.float64]] = {}
            for arm in ARMS:
                engine = Engine(catalog, encoders, seed=args.seed, taste=stores[arm])
                started = time.perf_counter()
                rows, near = [], []
                for m in members:
                    run = f"{nonce}-{ARMS.index(arm)}-{m.user.index}"
                    shown: list[str] = []
                    got = run_session(engine, m.user, m.user_id, truth, model, run, shown=shown)
                    rows.append(got + [np.nan] * (IMPRESSIONS - len(got)))
                    near.append(query_similarity(catalog, m.user.start_id, shown[:10]))
                raw[arm] = np.asarray(rows, dtype=np.float64)
                adherence[arm] = np.asarray(near, dtype=np.float64)
                log.info(
                    "%-20s %d users in %.1f s", arm, len(members), time.perf_counter() - started
                )
            examples = describe_clusters(stores["warm"], catalog, members)
    newcomer = np.array([m.newcomer for m in members])
    groups = {"established": ~newcomer, "newcomers": newcomer}
    report: dict[str, Any] = {"groups": {}, "fit": fitted.info | {"wall_s": round(fit_s, 2)}}
    for group, mask in groups.items():
        if not mask.any():
            continue
        stats = {arm: window_stats(raw[arm][mask]) for arm in ARMS}
        ratios = {
            arm: paired_ratio(raw[arm][mask], raw["cold"][mask], WINDOWS[0], args.seed)
            for arm in ARMS[1:]
        }
        closeness = {arm: mean_ci(adherence[arm][mask]) for arm in ARMS}
        report["groups"][group] = {
            "users": int(mask.sum()),
            "stats": stats,
            "ratios": ratios,
            "query_similarity_1_10": closeness,
        }
    report["history_s"] = round(history_s, 1)
    report["examples"] = examples
    return report


def query_similarity(catalog: Catalog, start: str, shown: Sequence[str]) -> float:
    """Mean cosine, in the visual space, between the start image and the images shown: what
    the warm start costs the query (the session did start from that image)."""
    keys = [catalog.key_for_id(i) for i in [start, *shown]]
    vectors = catalog.vectors("visual", [k for k in keys if k is not None])
    return float((vectors[1:] @ vectors[0]).mean())


def window_stats(u: NDArray[np.float64]) -> dict[str, tuple[float, float]]:
    return {f"{lo}-{hi}": mean_ci(window_means(u, (lo, hi))) for lo, hi in WINDOWS}


def describe_clusters(
    store: TasteStore | None, catalog: Catalog, members: Sequence[Member]
) -> list[dict[str, Any]]:
    """What the model says about one established user per cluster (a sanity check)."""
    if store is None:
        return []
    out = []
    seen: set[int] = set()
    for m in members:
        if m.newcomer or m.cluster in seen:
            continue
        seen.add(m.cluster)
        described = describe_taste(store, catalog, m.user_id, n_terms=6, n_images=0)
        out.append(
            {
                "user": m.user_id,
                "liked": m.user.liked,
                "terms": [term for term, _, _ in described.terms],
            }
        )
    return out


# --------------------------------------------------------------------------- fit time


def fit_time_benchmark(args: argparse.Namespace, config: TasteConfig) -> dict[str, Any]:
    """Fit on a synthetic catalog of ``--fit-items`` x ``--fit-users`` (module docstring)."""
    rng = np.random.default_rng([args.seed, 77])
    n, m, per_user, dim = args.fit_items, args.fit_users, args.fit_events, 384
    n_centres, n_tastes = 200, 50
    started = time.perf_counter()
    centres = _unit(rng.standard_normal((n_centres, 2 * dim)).astype(np.float32))
    item_centre = rng.integers(n_centres, size=n)
    joint = np.empty((n, 2 * dim), dtype=np.float32)
    for lo in range(0, n, 50_000):
        hi = min(lo + 50_000, n)
        noise = rng.standard_normal((hi - lo, 2 * dim)).astype(np.float32)
        block = centres[item_centre[lo:hi]] + 1.5 * noise / np.float32(math.sqrt(2 * dim))
        block[:, :dim] = _unit(block[:, :dim])
        block[:, dim:] = _unit(block[:, dim:])
        joint[lo:hi] = block  # two unit-norm 384-d spaces side by side
    # each taste cluster likes 4 of the item centres
    liked = rng.choice(n_centres, size=(n_tastes, 4), replace=n_tastes * 4 > n_centres)
    user_taste = rng.integers(n_tastes, size=m)
    users = np.repeat(np.arange(m), per_user)
    items = rng.integers(n, size=m * per_user)
    # half the impressions come from the user's liked centres (a steered feed), half at random
    steered = rng.random(m * per_user) < 0.5
    by_centre = np.argsort(item_centre, kind="stable")
    starts = np.searchsorted(item_centre[by_centre], np.arange(n_centres))
    ends = np.searchsorted(item_centre[by_centre], np.arange(n_centres), side="right")
    pick = liked[user_taste[users[steered]], rng.integers(4, size=int(steered.sum()))]
    offset = (rng.random(len(pick)) * (ends[pick] - starts[pick])).astype(np.int64)
    items[steered] = by_centre[starts[pick] + offset]
    likes = np.any(liked[user_taste[users]] == item_centre[items][:, None], axis=1)
    dwell = 1500.0 * np.exp(1.0 * likes + 0.8 * rng.standard_normal(len(items)))
    synth_s = time.perf_counter() - started
    log.info("synthetic %d users x %d items, %d events (%.1f s)", m, n, len(items), synth_s)

    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    data = interactions(users, items, dwell, (m, n), config.alpha)
    t1 = time.perf_counter()
    basis_s = als_s = 0.0
    accuracy, losses = {}, {}
    sample_rows = rng.choice(n, size=min(config.pca_sample, n), replace=False)
    for name, lo in (("visual", 0), ("text", dim)):  # one model per space, as fit_taste does
        started = time.perf_counter()
        basis = fit_basis(joint[sample_rows, lo : lo + dim], config.rank)
        anchors = np.concatenate(
            [joint[a : a + 100_000, lo : lo + dim] @ basis.basis for a in range(0, n, 100_000)]
        ).astype(np.float32)
        basis_s += time.perf_counter() - started
        result = fit_als(data, anchors, config)
        als_s += result.seconds
        # does each user's factor point to their cluster? (cluster profile: mean liked anchor)
        profiles = np.stack(
            [anchors[np.isin(item_centre, liked[c])].mean(axis=0) for c in range(n_tastes)]
        )
        guess = np.argmax(_unit(result.users) @ _unit(profiles).T, axis=1)
        accuracy[name] = round(float((guess == user_taste).mean()), 3)
        losses[name] = result.loss[-1]
    total = time.perf_counter() - t0
    return {
        "users": m,
        "items": n,
        "events": int(len(items)),
        "pairs": int(data.weight.nnz),
        "spaces": 2,
        "rank": config.rank,
        "iterations": config.iterations,
        "cg_steps": config.cg_steps,
        "matrices_s": round(t1 - t0, 2),
        "basis_s": round(basis_s, 2),
        "als_s": round(als_s, 2),
        "total_s": round(total, 2),
        "per_sweep_s": round(als_s / (2 * config.iterations), 2),
        "peak_rss_mb": round(peak_rss_mb(), 0),
        "rss_before_fit_mb": round(rss_before, 0),
        "final_objective": losses,
        "cluster_accuracy": accuracy,
        "chance": round(1 / n_tastes, 3),
    }


def _unit(x: NDArray[np.floating]) -> NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--users", type=int, default=160, help="established users")
    p.add_argument("--newcomers", type=int, default=40, help="users with only --few events")
    p.add_argument("--few", type=int, default=5, help="events a newcomer left")
    p.add_argument("--history", type=int, default=2, help="past sessions per established user")
    p.add_argument("--clusters", type=int, default=8, help="taste clusters")
    p.add_argument("--variation", type=float, default=0.25, help="P(one liked value differs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=2000, help="images in the sample dump")
    p.add_argument("--blend", type=float, default=TasteConfig.blend)
    p.add_argument("--rerank-terms", type=int, default=TasteConfig.rerank_terms)
    p.add_argument("--alpha", type=float, default=TasteConfig.alpha)
    p.add_argument("--mu", type=float, default=TasteConfig.mu)
    p.add_argument("--lam", type=float, default=TasteConfig.lam)
    p.add_argument("--rank", type=int, default=TasteConfig.rank)
    p.add_argument("--fit-users", type=int, default=10_000)
    p.add_argument("--fit-items", type=int, default=100_000)
    p.add_argument("--fit-events", type=int, default=50, help="events per synthetic user")
    p.add_argument("--fit-iterations", type=int, default=None, help="ALS sweeps (default: 8)")
    p.add_argument("--skip-fit-time", action="store_true")
    p.add_argument("--skip-warm-start", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    return p.parse_args(argv)


def print_report(report: dict[str, Any]) -> None:
    for group, body in report.get("warm_start", {}).get("groups", {}).items():
        print(f"\n{group} ({body['users']} users): mean utility per impression window")
        print("| arm | " + " | ".join(f"{lo}-{hi}" for lo, hi in WINDOWS) + " |")
        print("|---" * (len(WINDOWS) + 1) + "|")
        for arm, by_window in body["stats"].items():
            cells = [f"{m:.3f} ± {h:.3f}" for m, h in by_window.values()]
            print(f"| {arm} | " + " | ".join(cells) + " |")
        near = ", ".join(
            f"{arm} {m:.3f} ± {h:.3f}" for arm, (m, h) in body["query_similarity_1_10"].items()
        )
        print(f"visual cosine of impressions 1-10 to the query image: {near}")
        for arm, (r, lo, hi) in body["ratios"].items():
            ci = f"paired bootstrap 95% CI {lo:.2f}-{hi:.2f}"
            print(f"{arm}/cold, impressions 1-10: {r:.2f}x ({ci})")
    if "warm_start" in report:
        fit = report["warm_start"]["fit"]
        print(
            f"\nfit from the catalog: {fit['users']} users, {fit['items']} items, "
            f"{fit['events']} events, ALS {fit['als_s']} s, total {fit['wall_s']} s"
        )
        for example in report["warm_start"]["examples"]:
            print(f"  {example['user']} likes {example['liked']}: {', '.join(example['terms'])}")
    if "fit_time" in report:
        f = report["fit_time"]
        print(
            f"\nfit time, {f['users']} users x {f['items']} items, {f['events']} events, "
            f"2 spaces, rank {f['rank']}, {f['iterations']} sweeps: matrices {f['matrices_s']} s, "
            f"bases {f['basis_s']} s, ALS {f['als_s']} s ({f['per_sweep_s']} s/sweep/space), "
            f"total {f['total_s']} s, peak RSS {f['peak_rss_mb']:.0f} MB; users pointing to "
            f"their cluster {f['cluster_accuracy']} (chance {f['chance']})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("sentence_transformers", "indexer", "recommender"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = TasteConfig(
        blend=args.blend,
        alpha=args.alpha,
        mu=args.mu,
        lam=args.lam,
        rank=args.rank,
        rerank_terms=args.rerank_terms,
    )
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if not args.skip_warm_start:
        report["warm_start"] = warm_start_benchmark(args, config)
    if not args.skip_fit_time:
        sweeps = args.fit_iterations or config.iterations
        report["fit_time"] = fit_time_benchmark(args, replace(config, iterations=sweeps))
    report["config"] = {**vars(args), "taste": asdict(config)}
    report["config"]["wall_s"] = round(time.perf_counter() - started, 1)
    print_report(report)
    print(f"\n{report['config']['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
