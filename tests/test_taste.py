"""Collaborative taste: the ALS fit on planted data, the fit from a catalog's dwell feedback,
warm-started sessions, borrowing for users with few events, ``GET /v1/users/{id}/taste`` and
``lookalike taste fit / show``. Small and offline: fake encoders, or the weight-free pixels one."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.catalog import Catalog, NewItem
from indexer.encoders import EncoderSpec, create_encoder, l2_normalise, profile_specs
from indexer.pipeline import PipelineConfig, index_dump
from indexer.records import DumpRecord
from indexer.sample_dump import write_sample_dump
from recommender.api import ItemQuery
from recommender.engine import Engine
from recommender.taste import (
    TASTE_FILE,
    TasteConfig,
    TasteError,
    TasteModel,
    TasteStore,
    UnknownUserError,
    describe_taste,
    fit_als,
    fit_taste,
    interactions,
    solve_rows,
    standardise_per_row,
)
from recommender.types import unit
from service.app import create_app
from service.settings import Settings
from tests.cli_helpers import run_cli
from tests.fakes import HashTextEncoder

RANK = 16


# --------------------------------------------------------------------------- pure parts


def test_dwell_is_standardised_per_user_robustly() -> None:
    rng = np.random.default_rng(0)
    slow = np.log(4000 * np.exp(0.5 * rng.standard_normal(30)))  # a slow reader
    fast = np.log(800 * np.exp(0.5 * rng.standard_normal(30)))
    few = np.log(np.array([1000.0, 3000.0]))  # too few events: pooled median and spread
    values = np.concatenate([slow, fast, few])
    rows = np.repeat([0, 1, 2], [30, 30, 2])
    z = standardise_per_row(values, rows, 3)
    assert abs(np.median(z[:30])) < 0.05 and abs(np.median(z[30:60])) < 0.05
    assert 0.5 < np.median(np.abs(z[:30])) * 1.4826 < 1.5  # unit robust spread per user
    pooled = np.median(values)
    assert np.sign(z[60:]).tolist() == np.sign(few - pooled).tolist()
    outlier = standardise_per_row(np.append(slow, np.log(1e7)), np.zeros(31, np.int64), 1)
    assert outlier[-1] == 3.0  # a "distracted" view is clipped


def planted(
    seed: int = 0, users: int = 240, items: int = 1500, clusters: int = 4, per_user: int = 40
) -> dict[str, Any]:
    """Items around cluster centres in a rank-16 space; each user likes one cluster's items."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, RANK))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    item_cluster = rng.integers(clusters, size=items)
    anchors = centres[item_cluster] + 0.6 * rng.standard_normal((items, RANK)) / np.sqrt(RANK)
    anchors = (anchors / np.linalg.norm(anchors, axis=1, keepdims=True)).astype(np.float32)
    user_cluster = rng.integers(clusters, size=users)
    u = np.repeat(np.arange(users), per_user)
    j = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    liked = item_cluster[j] == user_cluster[u]
    dwell = 1500.0 * np.exp(1.0 * liked + 0.8 * rng.standard_normal(len(j)))
    return {
        "data": interactions(u, j, dwell, (users, items), alpha=10.0),
        "anchors": anchors,
        "centres": centres,
        "user_cluster": user_cluster,
    }


def test_row_solves_match_a_dense_solution() -> None:
    p = planted(users=30, items=200, per_user=25)
    data, other, reg = p["data"], p["anchors"], 2.0
    exact = solve_rows(data, other, reg, None, chunk_elements=1 << 10)  # several batches
    cg = solve_rows(data, other, reg, None, np.zeros_like(exact), cg_steps=3 * RANK)
    weight, target = data.weight.toarray(), data.target.toarray()
    for row in range(30):
        a = (other.T * (weight[row] + 1.0)) @ other + reg * np.eye(RANK)
        x = np.linalg.solve(a.astype(np.float64), other.T @ target[row])
        np.testing.assert_allclose(exact[row], x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cg[row], x, rtol=1e-3, atol=1e-4)
    prior = np.ones((200, RANK), np.float32)  # an item with no events solves to its anchor prior
    by_item = data.transpose()
    assert (np.diff(by_item.weight.indptr) == 0).any()
    items = solve_rows(by_item, exact, 1e6, prior)
    cold = np.diff(by_item.weight.indptr) == 0
    np.testing.assert_allclose(items[cold], 1.0, atol=1e-2)


@pytest.mark.parametrize("cg_steps", [0, 3])
def test_als_recovers_planted_taste_clusters(cg_steps: int) -> None:
    p = planted()
    config = TasteConfig(rank=RANK, cg_steps=cg_steps, track_loss=True)
    result = fit_als(p["data"], p["anchors"], config)
    assert len(result.loss) == config.iterations
    assert all(b <= a * (1 + 1e-6) for a, b in zip(result.loss, result.loss[1:], strict=False))
    assert result.loss[-1] < result.loss[0]
    guess = np.argmax(result.users @ p["centres"].T, axis=1)
    assert (guess == p["user_cluster"]).mean() >= 0.75  # chance: 0.25


def test_anchor_keeps_item_factors_near_their_embeddings() -> None:
    p = planted()

    def anchor_cosine(mu: float) -> float:
        items = fit_als(p["data"], p["anchors"], TasteConfig(rank=RANK, mu=mu)).items
        cos = np.sum(items * p["anchors"], axis=1) / np.linalg.norm(items, axis=1)
        return float(cos.mean())

    strong, default, weak = anchor_cosine(1000.0), anchor_cosine(10.0), anchor_cosine(0.1)
    assert strong > 0.99
    assert default > 0.85
    assert weak < default - 0.2  # without the anchor, item factors drift from the images


# --------------------------------------------------------------------------- from a catalog

WORDS = ("ember", "frost", "dusk", "plum")  # one per cluster; distinct HashTextEncoder bins
FILLERS = ("calm", "bright", "old", "new", "soft", "wild", "quiet")
PER_CLUSTER = 50


@dataclass
class Population:
    catalog: Catalog
    model: TasteModel
    liked: dict[str, int]  # user id -> liked cluster
    newcomer: str

    @staticmethod
    def cluster(item_id: str) -> int:
        return int(item_id.split("-")[0])

    def share(self, ids: list[str], cluster: int) -> float:
        return sum(self.cluster(i) == cluster for i in ids) / max(len(ids), 1)


def planted_catalog(root: Path, rng: np.random.Generator) -> Catalog:
    """Four clusters of items: visual vectors around a centre each, prompts naming the
    cluster's word (embedded by the fake text encoder), the word as a tag."""
    text = HashTextEncoder()
    visual_spec = EncoderSpec("planted", "fake", "visual", "fake", 16, "v1")
    catalog = Catalog.create_or_open(root, {"visual": visual_spec, "text": text.spec})
    centres = rng.standard_normal((len(WORDS), 16))
    items, visual, prompts = [], [], []
    for c, word in enumerate(WORDS):
        for i in range(PER_CLUSTER):
            prompt = f"{word} {rng.choice(FILLERS)}"  # the fake encoder splits on spaces
            record = DumpRecord(
                id=f"{c}-{i}", image_path=root / "x.png", prompt=prompt, tags=(word,)
            )
            items.append(NewItem(record, str(root / f"{c}-{i}.png"), f"h{c}-{i}", 1, 0, 8, 8))
            visual.append(centres[c] + 0.6 * rng.standard_normal(16))
            prompts.append(prompt)
    vectors = {"visual": l2_normalise(np.array(visual)), "text": text.embed_batch(prompts)}
    catalog.add(items, vectors)
    return catalog


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Population]:
    """Eight users per cluster left dwell (long on their cluster's items), a newcomer four
    events, an anonymous session one; then the taste is fitted."""
    rng = np.random.default_rng(5)
    catalog = planted_catalog(tmp_path_factory.mktemp("taste") / "catalog", rng)
    ids = [item.id for item in catalog.iter_items()]
    liked: dict[str, int] = {}

    def leave(user: str, shown: list[str], cluster: int) -> None:
        events = [
            (
                uuid.uuid4().hex,
                i,
                1500.0 * np.exp(1.2 * (Population.cluster(i) == cluster) + 0.5 * z),
            )
            for i, z in zip(shown, rng.standard_normal(len(shown)), strict=True)
        ]
        catalog.record_feedback(f"s-{user}", user, events)
        liked[user] = cluster

    for n in range(8 * len(WORDS)):
        cluster = n % len(WORDS)
        own = [i for i in ids if Population.cluster(i) == cluster]
        shown = list(rng.choice(ids, 30, replace=False)) + list(rng.choice(own, 10, replace=False))
        leave(f"u{n}", shown, cluster)
    own = [i for i in ids if Population.cluster(i) == 0]
    leave("newcomer", own[:2] + [i for i in ids if Population.cluster(i) == 2][:2], 0)
    catalog.record_feedback("anonymous", None, [(uuid.uuid4().hex, ids[0], 9000.0)])
    # rank 64 >= the 16 and 32 dims of the spaces: their bases are the identity
    model = fit_taste(catalog, TasteConfig(min_events=10, neighbours=5), HashTextEncoder())
    yield Population(catalog, model, liked, "newcomer")
    catalog.close()


def test_fit_reads_user_feedback_only(population: Population) -> None:
    model = population.model
    assert len(model) == 33 and "anonymous" not in model  # sessions without a user id
    assert model.info["events"] == 32 * 40 + 4  # the anonymous event is left out
    assert model.info["users"] == 33 and model.info["rank"] == {"visual": 16, "text": 32}
    assert model.factors["visual"].shape == (33, 16) and model.factors["text"].shape == (33, 32)
    assert all(len(loss) == 1 for loss in model.info["loss"].values())  # after the last sweep
    assert set(WORDS) <= set(model.vocab_terms.tolist())
    assert model.vocab_vecs.shape == (len(model.vocab_terms), 32)
    with pytest.raises(UnknownUserError):
        model.taste("stranger")


def test_taste_vectors_point_to_the_liked_cluster(population: Population) -> None:
    catalog, model = population.catalog, population.model
    ids = [item.id for item in catalog.iter_items()]
    keys = np.array([catalog.key_for_id(i) for i in ids])
    clusters = np.array([Population.cluster(i) for i in ids])
    for space in ("visual", "text"):
        vectors = catalog.vectors(space, keys)
        right = 0
        users = [u for u in population.liked if u != population.newcomer]
        for user in users:
            scores = vectors @ model.taste(user).vectors[space]
            means = [scores[clusters == c].mean() for c in range(len(WORDS))]
            right += int(np.argmax(means)) == population.liked[user]
        assert right / len(users) >= 0.9, space


def test_a_user_with_few_events_borrows_from_similar_users(population: Population) -> None:
    model = population.model
    _, borrowed = model.user_factors(population.newcomer)
    assert borrowed > 0
    assert model.user_factors("u0")[1] == 0  # established users stand on their own
    alone = replace(model.config, min_events=0)
    own = TasteModel(alone, model.bases, model.users, model.factors, model.n_items)
    cluster = [u for u, c in population.liked.items() if c == 0 and u != population.newcomer]
    centre = np.mean([model.taste(u).vectors["visual"] for u in cluster], axis=0)
    borrowing = model.taste(population.newcomer).vectors["visual"]
    assert borrowing @ centre > own.taste(population.newcomer).vectors["visual"] @ centre


def test_warm_started_first_page_leans_to_the_users_cluster(population: Population) -> None:
    catalog = population.catalog
    keys = {
        c: [catalog.key_for_id(f"{c}-{i}") or 0 for i in range(PER_CLUSTER)] for c in (0, 1, 2, 3)
    }
    centroid = {c: unit(catalog.vectors("visual", k).mean(axis=0)) for c, k in keys.items()}
    warm = Engine(catalog, {}, seed=0, taste=TasteStore(model=population.model))
    cold = Engine(catalog, {}, seed=0)
    share: dict[str, list[float]] = {"warm": [], "cold": []}
    closeness: dict[str, list[float]] = {"warm": [], "cold": []}
    for user, cluster in population.liked.items():
        start = f"{(cluster + 1) % len(WORDS)}-0"  # a query from another cluster
        for name, engine in (("warm", warm), ("cold", cold)):
            session = engine.create_session(user)
            ids = [
                i.id for i in engine.search(ItemQuery(start), session_id=session, limit=10).items
            ]
            share[name].append(population.share(ids, cluster))
            page = catalog.vectors("visual", [catalog.key_for_id(i) or 0 for i in ids])
            closeness[name].append(float((page @ centroid[cluster]).mean()))
    assert np.mean(share["cold"]) < 0.05  # the query alone stays in its own cluster
    assert np.mean(share["warm"]) > np.mean(share["cold"]) + 0.1
    assert np.mean(closeness["warm"]) > np.mean(closeness["cold"]) + 0.1
    # anonymous sessions are untouched by the taste model
    engines = [
        Engine(catalog, {}, seed=1, taste=TasteStore(model=population.model)),
        Engine(catalog, {}, seed=1),
    ]
    pages = [engine.search(ItemQuery("0-1"), limit=10) for engine in engines]
    assert [i.id for i in pages[0].items] == [i.id for i in pages[1].items]


def test_model_round_trips_and_the_store_follows_refits(
    population: Population, tmp_path: Path
) -> None:
    path = tmp_path / TASTE_FILE
    population.model.save(path)
    loaded = TasteModel.load(path)
    for space in ("visual", "text"):
        np.testing.assert_array_equal(loaded.factors[space], population.model.factors[space])
    assert loaded.users.tolist() == population.model.users.tolist()
    assert loaded.config == population.model.config
    assert loaded.vocab_terms.tolist() == population.model.vocab_terms.tolist()
    query = {"visual": population.catalog.vectors("visual", [1])[0]}
    a = population.model.blend(query, population.model.taste("u1"))
    b = loaded.blend(query, loaded.taste("u1"))
    np.testing.assert_allclose(a["visual"], b["visual"], atol=1e-6)
    assert set(a) == {"visual", "text"}  # the text space the query lacked comes from the taste

    assert TasteStore.for_catalog(tmp_path / "nothing-yet").model() is None
    store = TasteStore(path)
    assert len(store.model() or []) == 33
    few = {space: f[:3] for space, f in loaded.factors.items()}
    smaller = TasteModel(loaded.config, loaded.bases, loaded.users[:3], few, loaded.n_items[:3])
    smaller.save(path)
    assert len(store.model() or []) == 3  # a refit is picked up without a restart

    path.write_bytes(b"not a model")  # broken: a clear error, and sessions start cold
    with pytest.raises(TasteError, match="Cannot read the taste model"):
        store.model()
    engine = Engine(population.catalog, {}, seed=0, taste=store)
    session = engine.create_session("u1")
    assert engine.search(ItemQuery("0-1"), session_id=session, limit=5).items


def test_describe_names_the_cluster_and_shows_its_images(population: Population) -> None:
    store = TasteStore(model=population.model)
    for user in ("u0", "u1", "u2", "u3"):
        cluster = population.liked[user]
        described = describe_taste(store, population.catalog, user, n_terms=5, n_images=8)
        sims = [s for _, _, s in described.terms]
        assert len(described.terms) == 5 and sims == sorted(sims, reverse=True)
        assert WORDS[cluster] in described.terms[0][0].split()
        assert population.share([i for i, _, _ in described.images], cluster) >= 0.75


def test_taste_endpoint(population: Population, tmp_path: Path) -> None:
    settings = Settings(catalog=population.catalog.path, rate_limit_per_s=0)
    warm = Engine(population.catalog, {}, seed=0, taste=TasteStore(model=population.model))
    with TestClient(create_app(settings, warm)) as client:
        ok = client.get("/v1/users/u0/taste", params={"terms": 4, "images": 3})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["user_id"] == "u0" and body["events"] > 10 and body["borrowed_from"] == 0
        top = body["terms"][0]
        assert "ember" in top["term"].split() and top["kind"] in ("tag", "term")
        assert set(top) == {"term", "kind", "similarity"}
        assert len(body["terms"]) == 4 and len(body["images"]) == 3
        assert body["images"][0]["url"] == f"/v1/images/{body['images'][0]['id']}"
        assert client.get("/v1/users/newcomer/taste").json()["borrowed_from"] > 0
        unknown = client.get("/v1/users/stranger/taste")
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_user"
        assert client.get("/v1/users/u0/taste", params={"images": 500}).status_code == 422
    cold = Engine(population.catalog, {}, seed=0, taste=TasteStore.for_catalog(tmp_path))
    with TestClient(create_app(settings, cold)) as client:
        missing = client.get("/v1/users/u0/taste")
        assert missing.status_code == 409
        assert missing.json()["error"]["code"] == "taste_not_fitted"
        assert "lookalike taste fit" in missing.json()["error"]["message"]


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def pixels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image catalog with the weight-free pixels encoder only (no text space)."""
    root = tmp_path_factory.mktemp("taste_cli")
    write_sample_dump(root / "dump", 40, 3)
    encoder = create_encoder(profile_specs("offline")["visual"], device="cpu", dtype="fp32")
    encoder.load()
    with Catalog.create_or_open(root / "catalog", {"visual": encoder.spec}) as catalog:
        index_dump(root / "dump", catalog, {"visual": encoder}, PipelineConfig(progress=False))
    return root / "catalog"


@pytest.mark.usefixtures("restore_logging")
def test_taste_fit_and_show_commands(
    pixels_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalog_dir = tmp_path / "catalog"
    shutil.copytree(pixels_dir, catalog_dir)
    code = run_cli(monkeypatch, "taste", "fit", "--catalog", str(catalog_dir))
    assert code == 2
    assert "No feedback from sessions with a user id" in capsys.readouterr().err

    with Catalog.open(catalog_dir) as catalog:
        ids = [item.id for item in catalog.iter_items()]
        rng = np.random.default_rng(0)
        for user in ("ann", "bob", "cat"):
            events = [(uuid.uuid4().hex, i, float(rng.uniform(200, 9000))) for i in ids[:25]]
            catalog.record_feedback(f"s-{user}", user, events)
    code = run_cli(
        monkeypatch, "taste", "fit", "--catalog", str(catalog_dir), "--rank", "8", "--json"
    )
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    assert info["users"] == 3 and info["events"] == 75 and info["rank"] == {"visual": 8}
    assert (catalog_dir / TASTE_FILE).exists()
    assert run_cli(monkeypatch, "taste", "fit", "--catalog", str(catalog_dir)) == 0
    summary = capsys.readouterr().out
    assert f"taste fitted: 3 users, {len(ids)} items, 75 events; visual (rank 64)" in summary
    served = Engine.from_catalog(catalog_dir)  # what `lookalike serve` opens
    try:
        assert served.taste is not None and len(served.taste.model() or []) == 3
    finally:
        served.close()

    code = run_cli(monkeypatch, "taste", "show", "bob", "--catalog", str(catalog_dir), "--json")
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["user_id"] == "bob" and shown["terms"] == []  # no text space to describe with
    assert len(shown["images"]) == 8 and set(shown["images"][0]) == {"id", "similarity", "prompt"}

    code = run_cli(monkeypatch, "taste", "show", "nobody", "--catalog", str(catalog_dir))
    assert code == 2
    assert "no taste is known for user 'nobody'" in capsys.readouterr().err
