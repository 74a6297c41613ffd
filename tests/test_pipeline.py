"""Dump -> catalog end to end with small fake encoders (the real ones are tested on their own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import indexer.dump
from indexer.catalog import Catalog
from indexer.encoders import create_encoder
from indexer.encoders.base import ImageEncoder
from indexer.filters import Filters
from indexer.pipeline import PipelineConfig, Shard, encode_batch, index_dump
from indexer.sample_dump import write_sample_dump
from tests.fakes import HashTextEncoder, fake_encoders, specs


@pytest.fixture(scope="module")
def sample_dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dump")
    write_sample_dump(root, count=60, seed=3)
    return root


def truth(dump: Path) -> list[dict]:
    return [json.loads(line) for line in (dump / "truth.jsonl").read_text().splitlines()]


def run_index(dump: Path, catalog_dir: Path, **config: object) -> tuple[Catalog, object]:
    catalog = Catalog.create_or_open(catalog_dir, specs())
    settings = PipelineConfig(batch_size=8, progress=False, **config)  # type: ignore[arg-type]
    report = index_dump(dump, catalog, fake_encoders(), settings)
    return catalog, report


def test_index_counts_every_record_once(sample_dump: Path, tmp_path: Path) -> None:
    catalog, report = run_index(sample_dump, tmp_path / "cat")
    rows = truth(sample_dump)
    broken = sum(r["broken"] for r in rows)
    duplicates = sum(r["duplicate_of"] is not None for r in rows)
    assert report.indexed == len(rows) - broken - duplicates  # type: ignore[attr-defined]
    assert report.duplicates == duplicates  # type: ignore[attr-defined]
    assert sum(report.skipped.values()) == broken  # type: ignore[attr-defined]
    assert len(catalog) == report.indexed  # type: ignore[attr-defined]
    assert all(len(index) == len(catalog) for index in catalog.indexes.values())
    dup = next(r for r in rows if r["duplicate_of"] is not None)
    assert catalog.key_for_id(dup["id"]) == catalog.key_for_id(dup["duplicate_of"])
    good = next(r for r in rows if not r["broken"] and r["duplicate_of"] is None)
    item = catalog.item(good["id"])
    assert item is not None
    with Image.open(item.file) as file:  # the file's size, not what its JSON claims
        assert (item.width, item.height) == file.size


def test_rerun_processes_only_new_or_changed_files(sample_dump: Path, tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    write_sample_dump(dump, count=30, seed=5)
    catalog, first = run_index(dump, tmp_path / "cat")
    catalog.close()
    catalog, again = run_index(dump, tmp_path / "cat")
    assert again.indexed == 0  # type: ignore[attr-defined]
    assert again.unchanged == first.indexed  # type: ignore[attr-defined]
    catalog.close()
    victim = next(r for r in truth(dump) if not r["broken"] and r["duplicate_of"] is None)
    item = Catalog.open(tmp_path / "cat").item(victim["id"])
    assert item is not None
    Image.new("RGB", (64, 64), (1, 2, 3)).save(item.file, format=Image.open(item.file).format)
    catalog, third = run_index(dump, tmp_path / "cat")
    assert third.indexed == 1  # type: ignore[attr-defined]
    assert len(catalog) == first.indexed  # type: ignore[attr-defined]


def test_items_keep_their_files_size_not_the_one_their_json_claims(tmp_path: Path) -> None:
    """civitai gives the original's size; the file downloaded (width=450) is smaller."""
    dump = tmp_path / "dump"
    (dump / "images").mkdir(parents=True)
    Image.new("RGB", (450, 660), (200, 30, 30)).save(dump / "images" / "1.jpeg")
    page = {"items": [{"id": 1, "width": 832, "height": 1216, "meta": {"prompt": "x"}}]}
    (dump / "page.json").write_text(json.dumps(page))
    catalog, _ = run_index(dump, tmp_path / "cat", draft_size=64)  # decoded at 1/4 scale
    item = catalog.item("1")
    assert item is not None and (item.width, item.height) == (450, 660)


def test_a_rejected_file_is_logged_like_the_dumps_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    dump = tmp_path / "dump"
    (dump / "sub").mkdir(parents=True)
    (dump / "sub" / "empty.png").write_bytes(b"")
    (dump / "page.json").write_text("{broken")
    (dump / "more.json").write_text(json.dumps({"items": [{"id": 1, "nsfwLevel": "X"}]}))

    def failing_open(path: str, *args: Any) -> Any:
        if path.endswith("more.json"):  # as a file the indexer may not read (tests run as root)
            raise PermissionError(13, "Permission denied", path)
        return open(path, *args)

    monkeypatch.setattr(indexer.dump, "open", failing_open, raising=False)
    with caplog.at_level("INFO", logger="indexer"):
        catalog, report = run_index(dump, tmp_path / "cat")
    assert report.skipped == {"empty": 1, "bad_json": 1, "unreadable": 1}  # type: ignore[attr-defined]
    assert "2 JSON file(s)" in report.warnings()[0]  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert any(line.startswith("skipped page.json: bad_json ") for line in lines), lines
    assert any(line.startswith("skipped sub/empty.png: empty ") for line in lines), lines


@pytest.mark.parametrize("page_file", ["page.json", "pages/page.json"])
def test_metadata_that_arrives_after_its_images_were_indexed_bare_is_taken(
    tmp_path: Path, page_file: str
) -> None:
    """Images downloaded before their JSON pages (or a page that could not be read until it
    was fixed): the re-run gives the items their records' ids and metadata, as a fresh index
    of the same dump would, and the bare ids stay as aliases. pages/ beside images/ is also
    how a catalog built before lookalike looked there is mended."""
    dump = tmp_path / "dump"
    (dump / "images").mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for n, colour in enumerate(colours, start=1):
        Image.new("RGB", (32, 32), colour).save(dump / "images" / f"{n}.jpeg")
    catalog, first = run_index(dump, tmp_path / "cat")
    assert first.indexed == 3 and first.warnings() == []  # type: ignore[attr-defined]
    assert catalog.item("images/1") is not None and catalog.item("images/1").nsfw_level == 0
    catalog.close()

    page = {
        "items": [
            {"id": n, "nsfwLevel": "X", "meta": {"prompt": f"late prompt {n}"}, "tags": ["late"]}
            for n in (1, 2, 3)
        ]
    }
    (dump / page_file).parent.mkdir(exist_ok=True)
    (dump / page_file).write_text(json.dumps(page))
    catalog, second = run_index(dump, tmp_path / "cat")
    assert second.indexed == 0 and second.metadata_updated == 3  # type: ignore[attr-defined]
    assert len(catalog) == 3
    for n in (1, 2, 3):
        item = catalog.item(str(n))
        assert item is not None and item.id == str(n)
        assert (item.prompt, item.nsfw_level, item.tags) == (f"late prompt {n}", 3, ("late",))
        assert catalog.key_for_id(f"images/{n}") == catalog.key_for_id(str(n))  # an alias now
    safe_only = catalog.allowed_mask(Filters(max_nsfw_level=0))  # filters see the new level
    assert safe_only is not None and not safe_only.any()
    catalog.close()
    catalog, third = run_index(dump, tmp_path / "cat")
    assert (third.indexed, third.unchanged, third.metadata_updated) == (0, 3, 0)  # type: ignore[attr-defined]


def test_late_sidecars_reach_same_stem_and_symlinked_images(tmp_path: Path) -> None:
    """The bare ids the late records are matched with are the walker's own: x.gif beside
    x.webp are named in full (whichever came first), a symlinked file by its link's path."""
    dump = tmp_path / "dump"
    (dump / "art").mkdir(parents=True)
    (dump / "store").mkdir()
    Image.new("RGB", (32, 32), (30, 30, 200)).save(dump / "art" / "x.gif")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(dump / "art" / "x.webp")
    Image.new("RGB", (32, 32), (30, 200, 30)).save(dump / "store" / "blob.jpeg")
    (dump / "art" / "linked.jpeg").symlink_to(dump / "store" / "blob.jpeg")
    catalog, first = run_index(dump, tmp_path / "cat")
    assert catalog.item("art/x.gif") is not None and catalog.item("art/x.webp") is not None
    catalog.close()
    late = {"id": 777, "nsfwLevel": "X", "meta": {"prompt": "late"}}
    (dump / "art" / "x.webp.json").write_text(json.dumps(late))
    (dump / "art" / "linked.jpeg.json").write_text(json.dumps({**late, "id": 778}))
    catalog, second = run_index(dump, tmp_path / "cat")
    assert second.indexed == 0  # type: ignore[attr-defined]
    for new_id, old_id in (("777", "art/x.webp"), ("778", "art/linked")):
        item = catalog.item(new_id)
        assert item is not None and (item.nsfw_level, item.prompt) == (3, "late"), new_id
        assert catalog.key_for_id(old_id) == catalog.key_for_id(new_id)
    gif = catalog.item("art/x.gif")
    assert gif is not None and gif.nsfw_level == 0  # the other image kept its own id


def test_shards_partition_the_dump(sample_dump: Path, tmp_path: Path) -> None:
    parts = [run_index(sample_dump, tmp_path / f"part{i}", shard=Shard(i, 3))[0] for i in range(3)]
    whole, _ = run_index(sample_dump, tmp_path / "whole")
    for row in truth(sample_dump):
        owners = [i for i, part in enumerate(parts) if part.key_for_id(row["id"]) is not None]
        in_whole = whole.key_for_id(row["id"]) is not None
        # Every id the whole run knows lands in exactly one shard (duplicates whose original
        # fell in another shard are stored there as items: `lookalike merge` makes them aliases
        # again, see test_merge.py).
        assert len(owners) == (1 if in_whole else 0), row["id"]


_CHILD = """
import sys, time
from pathlib import Path
from tests.fakes import fake_encoders, specs
from indexer.catalog import Catalog
from indexer.pipeline import PipelineConfig, index_dump
encoders = fake_encoders()
inner = encoders["visual"].embed_batch
def slow(items):
    time.sleep(0.05)
    return inner(items)
encoders["visual"].embed_batch = slow
catalog = Catalog.create_or_open(Path({catalog!r}), specs())
index_dump(Path({dump!r}), catalog, encoders, PipelineConfig(batch_size=4, progress=False,
           checkpoint_seconds=0.1))
print("done")
"""


def test_sigkill_part_way_then_resume_gives_the_uninterrupted_result(
    sample_dump: Path, tmp_path: Path
) -> None:
    reference, _ = run_index(sample_dump, tmp_path / "reference")
    expected = {item.id for item in reference.iter_items()}
    target = tmp_path / "killed"
    code = _CHILD.format(
        tests=str(Path(__file__).parent), catalog=str(target), dump=str(sample_dump)
    )
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", code], env=env)
        time.sleep(float(rng.uniform(0.8, 2.5)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        # After every kill the catalog opens and is self-consistent.
        if (target / "manifest.json").exists():
            with Catalog.open(target) as partial:
                assert all(len(ix) == len(partial) for ix in partial.indexes.values())
                ids = [item.id for item in partial.iter_items()]
                assert len(ids) == len(set(ids)) and set(ids) <= expected
    finished = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    with Catalog.open(target) as resumed:
        assert {item.id for item in resumed.iter_items()} == expected
        assert all(len(ix) == len(resumed) for ix in resumed.indexes.values())
        key = resumed.key_for_id(sorted(expected)[0])
        ref_key = reference.key_for_id(sorted(expected)[0])
        np.testing.assert_allclose(
            resumed.vectors("visual", [key]), reference.vectors("visual", [ref_key]), atol=1e-6
        )


def test_decode_workers_prepare_images_for_image_encoders(
    sample_dump: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resizing and cropping run in the decode pool, not on the thread that runs the models,
    and the vectors are the ones ``embed_batch`` gives for the same images."""
    pixels = create_encoder("pixels")
    assert isinstance(pixels, ImageEncoder)
    threads: list[str] = []
    preprocess = pixels.preprocess

    def spy(items: list[Image.Image]) -> object:
        threads.append(threading.current_thread().name)
        return preprocess(items)

    monkeypatch.setattr(pixels, "preprocess", spy)
    encoders = {"visual": pixels, "text": HashTextEncoder()}
    catalog = Catalog.create_or_open(tmp_path / "cat", {s: e.spec for s, e in encoders.items()})
    config = PipelineConfig(batch_size=8, progress=False)
    report = index_dump(sample_dump, catalog, encoders, config)
    assert report.indexed > 8 and len(catalog) == report.indexed
    assert len(threads) >= report.indexed and all(t.startswith("decode") for t in threads)

    stored = [catalog.item(row["id"]) for row in truth(sample_dump) if not row["broken"]][:10]
    images = [Image.open(item.file).convert("RGB") for item in stored if item is not None]
    prepared = [{"visual": preprocess([image])} for image in images]
    with_prepared = encode_batch({"visual": pixels}, images, [], prepared)["visual"]
    np.testing.assert_array_equal(with_prepared, pixels.embed_batch(images))
    assert len(with_prepared) == len(images) >= 6
