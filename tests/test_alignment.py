"""Text-image alignment scores with a tiny random CLIP (conftest's ``tiny_clip_dir``): stored at
index time, the ``min_alignment`` filter, ``POST /v1/score``, ``lookalike score`` — and the clear
"needs CLIP" answers of a catalog without a clip space."""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.alignment import ALIGNMENT_SCALE, align_catalog
from indexer.catalog import Catalog, CatalogItem
from indexer.dump import iter_dump
from indexer.encoders import ClipEncoder, create_encoder
from indexer.pipeline import IndexReport, PipelineConfig, index_dump
from indexer.records import DumpRecord
from indexer.sample_dump import SampleDumpSummary
from indexer.text import clean_prompt
from recommender.alignment import ClipRequiredError, ScorePair, score_pairs
from recommender.api import ItemQuery
from recommender.engine import Engine
from recommender.retrieve import Filters, retrieve
from service.app import create_app
from service.settings import Settings
from tests.cli_helpers import run_cli
from tests.fakes import fake_encoders, specs


@dataclass
class ClipCatalog:
    catalog: Catalog
    clip: ClipEncoder
    report: IndexReport
    items: list[CatalogItem]
    dump: Path

    @property
    def engine(self) -> Engine:
        return Engine(self.catalog, {**fake_encoders(), "clip": self.clip}, seed=0)


@pytest.fixture(scope="module")
def clip_cat(
    tmp_path_factory: pytest.TempPathFactory,
    sample_dump_summary: SampleDumpSummary,
    tiny_clip_dir: str,
) -> Iterator[ClipCatalog]:
    clip = create_encoder("clip", model=tiny_clip_dir, device="cpu", dtype="fp32")
    clip.load()
    assert isinstance(clip, ClipEncoder)
    root = tmp_path_factory.mktemp("clip_catalog")
    catalog = Catalog.create_or_open(root / "catalog", {**specs(), "clip": clip.spec})
    encoders = {**fake_encoders(), "clip": clip}
    report = index_dump(
        sample_dump_summary.out_dir, catalog, encoders, PipelineConfig(progress=False)
    )
    yield ClipCatalog(
        catalog, clip, report, list(catalog.iter_items()), sample_dump_summary.out_dir
    )
    catalog.close()


@pytest.fixture(scope="module")
def offline_cat(
    tmp_path_factory: pytest.TempPathFactory, sample_dump_summary: SampleDumpSummary
) -> Iterator[Catalog]:
    root = tmp_path_factory.mktemp("offline_catalog")
    catalog = Catalog.create_or_open(root / "catalog", specs())
    index_dump(
        sample_dump_summary.out_dir, catalog, fake_encoders(), PipelineConfig(progress=False)
    )
    yield catalog
    catalog.close()


def expected_score(clip: ClipEncoder, catalog: Catalog, item: CatalogItem, text: str) -> float:
    image = catalog.vectors("clip", [item.key])[0]
    return float(ALIGNMENT_SCALE * image @ clip.embed_texts([clean_prompt(text)])[0])


def client_for(engine: Engine, catalog: Catalog) -> TestClient:
    return TestClient(create_app(Settings(catalog=catalog.path, rate_limit_per_s=0), engine))


def assert_error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


# --------------------------------------------------------------------------- index time


def test_index_stores_each_prompts_alignment(clip_cat: ClipCatalog) -> None:
    with_prompt = [item for item in clip_cat.items if clean_prompt(item.prompt)]
    without = [item for item in clip_cat.items if not clean_prompt(item.prompt)]
    assert with_prompt and without  # the sample dump has items whose meta is null
    assert clip_cat.report.aligned == len(with_prompt)
    stored = clip_cat.catalog.alignment([item.key for item in with_prompt])
    for item, score in zip(with_prompt, stored.tolist(), strict=True):
        assert item.prompt is not None
        assert score == pytest.approx(
            expected_score(clip_cat.clip, clip_cat.catalog, item, item.prompt), abs=1e-3
        )
    assert np.isnan(clip_cat.catalog.alignment([item.key for item in without])).all()
    assert np.ptp(stored) > 1.0  # scores differ from item to item
    assert "alignment scored" in clip_cat.report.summary()


def test_a_changed_prompt_is_scored_again(clip_cat: ClipCatalog, tmp_path: Path) -> None:
    catalog = clip_cat.catalog
    item = next(i for i in clip_cat.items if i.prompt)
    record = next(
        r for r in iter_dump(clip_cat.dump) if isinstance(r, DumpRecord) and r.id == item.id
    )
    before = float(catalog.alignment([item.key])[0])
    new_prompt = "a tiny purple hexagon on a striped background"
    try:
        assert catalog.update_metadata(item.id, replace(record, prompt=new_prompt))
        assert np.isnan(catalog.alignment([item.key])[0])  # cleared with the prompt change
        assert align_catalog(catalog, clip_cat.clip) == 1  # only that item is scored again
        after = float(catalog.alignment([item.key])[0])
        assert after == pytest.approx(
            expected_score(clip_cat.clip, catalog, item, new_prompt), abs=1e-3
        )
        assert after != pytest.approx(before, abs=1e-3)
    finally:
        catalog.update_metadata(item.id, record)
        align_catalog(catalog, clip_cat.clip)
    assert float(catalog.alignment([item.key])[0]) == pytest.approx(before, abs=1e-3)


# --------------------------------------------------------------------------- filter


def test_min_alignment_keeps_only_items_at_or_above_it(clip_cat: ClipCatalog) -> None:
    catalog = clip_cat.catalog
    keys = np.array([item.key for item in clip_cat.items])
    scores = catalog.alignment(keys)
    threshold = float(np.nanmedian(scores))
    passing = set(keys[scores >= threshold].tolist())
    assert 0 < len(passing) < len(keys)
    query = catalog.vectors("visual", [int(keys[0])])[0]
    everything = retrieve(catalog, "visual", query, k=len(keys))
    kept = retrieve(catalog, "visual", query, k=len(keys), filters=Filters(min_alignment=threshold))
    assert set(kept.keys.tolist()) == passing
    assert len(everything) == len(keys)

    page = clip_cat.engine.search(
        ItemQuery(clip_cat.items[0].id), filters=Filters(min_alignment=threshold), limit=10
    )
    assert page.items
    served = catalog.alignment([catalog.key_for_id(i.id) or -1 for i in page.items])
    assert (served >= threshold).all()


# --------------------------------------------------------------------------- API and engine


def test_score_pairs_by_id_and_by_upload(clip_cat: ClipCatalog) -> None:
    item = next(i for i in clip_cat.items if i.prompt)
    assert item.prompt is not None
    data = Path(item.file).read_bytes()
    got = score_pairs(
        clip_cat.engine,
        [
            ScorePair(item.prompt, image_id=item.id),
            ScorePair(item.prompt, image=data),
            ScorePair("a completely different text", image_id=item.id),
        ],
    )
    stored = float(clip_cat.catalog.alignment([item.key])[0])
    assert got[0] == pytest.approx(stored, abs=1e-3)
    # the upload is decoded in full, the index decoded a draft: same image, close embedding
    assert got[1] == pytest.approx(stored, abs=5.0)
    assert abs(got[2] - got[0]) > 1e-3


def test_post_score_one_pair_or_a_batch(clip_cat: ClipCatalog) -> None:
    item = next(i for i in clip_cat.items if i.prompt)
    assert item.prompt is not None
    stored = float(clip_cat.catalog.alignment([item.key])[0])
    b64 = base64.b64encode(Path(item.file).read_bytes()).decode()
    with client_for(clip_cat.engine, clip_cat.catalog) as client:
        one = client.post("/v1/score", json={"image_id": item.id, "text": item.prompt})
        assert one.status_code == 200, one.text
        assert one.json()["scores"] == [pytest.approx(stored, abs=1e-3)]
        assert one.json()["scale"] == 100.0
        batch = client.post(
            "/v1/score",
            json={
                "pairs": [
                    {"image_id": item.id, "text": item.prompt},
                    {"image_b64": b64, "text": item.prompt},
                ]
            },
        )
        assert batch.status_code == 200, batch.text
        assert len(batch.json()["scores"]) == 2
        assert batch.json()["scores"][0] == pytest.approx(stored, abs=1e-3)
        unknown = client.post("/v1/score", json={"image_id": "no-such-id", "text": "x"})
        assert_error(unknown, 404, "unknown_image")
        both = client.post("/v1/score", json={"image_id": item.id, "image_b64": b64, "text": "x"})
        assert_error(both, 422, "invalid_request")
        mixed = client.post(
            "/v1/score", json={"text": "x", "pairs": [{"image_id": item.id, "text": "x"}]}
        )
        assert_error(mixed, 422, "invalid_request")
        bad = client.post("/v1/score", json={"image_b64": "not base64!", "text": "x"})
        assert_error(bad, 422, "invalid_request")

        threshold = float(np.nanmedian(clip_cat.catalog.alignment([i.key for i in clip_cat.items])))
        search = client.post(
            "/v1/search",
            json={"image_id": item.id, "filters": {"min_alignment": threshold}, "limit": 10},
        )
        assert search.status_code == 200, search.text
        ids = [i["id"] for i in search.json()["items"]]
        assert ids
        keys = [clip_cat.catalog.key_for_id(i) or -1 for i in ids]
        assert (clip_cat.catalog.alignment(keys) >= threshold).all()


# --------------------------------------------------------------------------- without CLIP


def test_without_clip_every_entry_point_says_it_needs_clip(offline_cat: Catalog) -> None:
    item = next(iter(offline_cat.iter_items()))
    query = offline_cat.vectors("visual", [item.key])[0]
    with pytest.raises(ClipRequiredError, match="needs CLIP.*--profile default"):
        retrieve(offline_cat, "visual", query, filters=Filters(min_alignment=20.0))
    engine = Engine(offline_cat, fake_encoders(), seed=0)
    with client_for(engine, offline_cat) as client:
        message = assert_error(
            client.post("/v1/score", json={"image_id": item.id, "text": "a red circle"}),
            422,
            "unsupported_query",
        )
        assert "needs CLIP" in message and "no `clip` space" in message
        assert "--profile default" in message and "--clip-model" in message
        search = client.post(
            "/v1/search", json={"image_id": item.id, "filters": {"min_alignment": 20}}
        )
        assert "min_alignment filter needs CLIP" in assert_error(search, 422, "unsupported_query")


# --------------------------------------------------------------------------- CLI


def write_pairs(clip_cat: ClipCatalog, folder: Path) -> tuple[Path, list[CatalogItem]]:
    """A pairs CSV next to copies of a few dump images, plus a missing and a broken row."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [i for i in clip_cat.items if i.prompt][:5]
    (folder / "imgs").mkdir(exist_ok=True)
    rows = []
    for n, item in enumerate(items):
        name = f"imgs/{n}{Path(item.file).suffix}"
        (folder / name).write_bytes(Path(item.file).read_bytes())
        rows.append({"image": name, "text": item.prompt})
    (folder / "imgs" / "broken.png").write_bytes(b"not an image at all")
    rows += [
        {"image": "imgs/gone.png", "text": "missing file"},
        {"image": "imgs/broken.png", "text": "not an image"},
    ]
    path = folder / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path, items


@pytest.mark.usefixtures("restore_logging")
def test_score_command_writes_scores_and_a_summary(
    clip_cat: ClipCatalog,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs, items = write_pairs(clip_cat, tmp_path / "set")
    # fp32 like the engine it is compared with: ``auto`` takes bf16 on a CPU with AMX
    catalog = str(clip_cat.catalog.path)
    code = run_cli(
        monkeypatch, "score", str(pairs), "--catalog", catalog, "--dtype", "fp32", "--json"
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == len(items)
    assert summary["skipped"] == {"missing": 1, "not_an_image": 1}
    assert set(summary["percentiles"]) == {"p5", "p25", "p50", "p75", "p95"}
    assert summary["elapsed_s"] > 0 and summary["peak_rss_mb"] > 0
    with (tmp_path / "set" / "pairs.scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["error"] for r in rows] == [""] * len(items) + ["missing", "not_an_image"]
    scores = [float(r["score"]) for r in rows[: len(items)]]
    # the same full decode as an upload to POST /v1/score
    uploads = score_pairs(
        clip_cat.engine,
        [ScorePair(i.prompt or "", image=Path(i.file).read_bytes()) for i in items],
    )
    np.testing.assert_allclose(scores, uploads, atol=1e-3)
    assert summary["mean"] == pytest.approx(float(np.mean(scores)), abs=1e-3)


@pytest.mark.usefixtures("restore_logging")
def test_score_command_takes_a_clip_model_and_refuses_without_one(
    clip_cat: ClipCatalog,
    offline_cat: Catalog,
    tiny_clip_dir: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pairs, items = write_pairs(clip_cat, tmp_path / "set")
    out = tmp_path / "scores.csv"
    code = run_cli(monkeypatch, "score", str(pairs), "--clip-model", tiny_clip_dir, "-o", str(out))
    assert code == 0
    assert f"scored {len(items)} pairs, skipped 2" in capsys.readouterr().out
    assert out.exists()

    code = run_cli(monkeypatch, "score", str(pairs), "--catalog", str(offline_cat.path))
    assert code == 2
    err = capsys.readouterr().err
    assert "needs CLIP" in err and "no `clip` space" in err and "--clip-model" in err

    code = run_cli(monkeypatch, "score", str(pairs), "--catalog", str(tmp_path / "none"))
    assert code == 2
    assert "no catalog with a `clip` space or CLIP model" in capsys.readouterr().err

    (tmp_path / "bad.csv").write_text("path,caption\na.png,x\n")
    code = run_cli(monkeypatch, "score", str(tmp_path / "bad.csv"), "--clip-model", tiny_clip_dir)
    assert code == 2
    assert "columns `image` and `text`" in capsys.readouterr().err
