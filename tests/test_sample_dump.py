"""The procedural sample dump: determinism, its deliberate noise, and that it reads back."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from indexer import sample_dump as sample_dump_module
from indexer.dump import detect_format, iter_dump
from indexer.errors import ImageRejected
from indexer.images import decode_image
from indexer.records import DumpRecord
from indexer.sample_dump import (
    ATTRIBUTES,
    TRUTH_FILENAME,
    SampleDumpSummary,
    attributes_from_terms,
    prompt_for,
    random_attributes,
    render_image,
    write_sample_dump,
)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def items_of(summary: SampleDumpSummary) -> list[dict[str, Any]]:
    return [item for page in summary.pages for item in json.loads(page.read_text())["items"]]


def truth_of(summary: SampleDumpSummary) -> list[dict[str, Any]]:
    return [json.loads(line) for line in summary.truth_path.read_text().splitlines()]


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    first = write_sample_dump(tmp_path / "a", 25, seed=3)
    second = write_sample_dump(tmp_path / "b", 25, seed=3)
    other = write_sample_dump(tmp_path / "c", 25, seed=4)
    assert tree_digest(first.out_dir) == tree_digest(second.out_dir)
    assert tree_digest(first.out_dir) != tree_digest(other.out_dir)


def test_layout_and_pages(sample_dump_summary: SampleDumpSummary) -> None:
    assert [p.name for p in sample_dump_summary.pages] == ["page_0001.json"]
    page = json.loads(sample_dump_summary.pages[0].read_text())
    assert page["metadata"]["totalItems"] == sample_dump_summary.count
    assert len(page["items"]) == sample_dump_summary.count
    assert sample_dump_summary.truth_path.name == TRUTH_FILENAME
    assert len(truth_of(sample_dump_summary)) == sample_dump_summary.count


def test_pages_are_split_at_page_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample_dump_module, "PAGE_SIZE", 10)
    summary = write_sample_dump(tmp_path, 25, seed=0)
    assert [p.name for p in summary.pages] == ["page_0001.json", "page_0002.json", "page_0003.json"]
    documents = [json.loads(p.read_text()) for p in summary.pages]
    assert [len(d["items"]) for d in documents] == [10, 10, 5]
    assert documents[0]["metadata"]["nextPage"] and documents[2]["metadata"]["nextPage"] is None


def test_items_carry_the_noise_of_a_real_dump(sample_dump_summary: SampleDumpSummary) -> None:
    items = items_of(sample_dump_summary)
    metas = [item["meta"] for item in items]
    assert any(meta is None for meta in metas)
    assert any(isinstance(meta, dict) and "meta" in meta for meta in metas)
    assert any(isinstance(meta, dict) and "prompt" in meta for meta in metas)
    tag_kinds = {type(tag).__name__ for item in items for tag in item["tags"]}
    assert tag_kinds == {"dict", "str"}
    assert Counter(item["nsfwLevel"] for item in items).most_common(1)[0][0] == "None"
    assert len({item["baseModel"] for item in items}) > 1
    names = {p.name for p in sample_dump_summary.images_dir.iterdir()}
    by_id = {item["id"] for item in items if any(n.startswith(f"{item['id']}.") for n in names)}
    assert 0 < len(by_id) < len(items)  # some files named by id, the rest by URL file name
    assert {Path(n).suffix for n in names} >= {".png", ".webp"}
    assert {Path(n).suffix for n in names} & {".jpg", ".jpeg"}


def test_duplicates_and_broken_files(sample_dump_summary: SampleDumpSummary) -> None:
    truth = {row["id"]: row for row in truth_of(sample_dump_summary)}
    records = {e.id: e for e in iter_dump(sample_dump_summary.out_dir) if isinstance(e, DumpRecord)}
    assert sample_dump_summary.duplicate_ids
    for ident in sample_dump_summary.duplicate_ids:
        original = truth[ident]["duplicate_of"]
        assert original is not None and original != ident
        assert records[ident].image_path != records[original].image_path
        assert records[ident].image_path.read_bytes() == records[original].image_path.read_bytes()
    reasons = set()
    for ident in sample_dump_summary.broken_ids:
        assert truth[ident]["broken"] is True
        with pytest.raises(ImageRejected) as caught:
            decode_image(records[ident].image_path)
        reasons.add(caught.value.reason)
    assert reasons == {"truncated", "empty", "not_an_image"}


def test_iter_dump_reads_every_item_and_ignores_the_truth(
    sample_dump_summary: SampleDumpSummary,
) -> None:
    entries = list(iter_dump(sample_dump_summary.out_dir))
    records = [e for e in entries if isinstance(e, DumpRecord)]
    assert records == entries  # nothing skipped: the truth file is not read as dump data
    assert [e.id for e in records] == [row["id"] for row in truth_of(sample_dump_summary)]
    assert detect_format(sample_dump_summary.out_dir) == "civitai-api"
    nulls = [e for e in records if e.id in sample_dump_summary.meta_null_ids]
    assert nulls and all(e.prompt is None for e in nulls)


def test_healthy_images_decode(sample_dump_summary: SampleDumpSummary) -> None:
    bad = set(sample_dump_summary.broken_ids)
    for entry in iter_dump(sample_dump_summary.out_dir):
        if isinstance(entry, DumpRecord) and entry.id not in bad:
            assert min(decode_image(entry.image_path).size) > 0  # never raises ImageRejected


def test_render_image_size_and_mode() -> None:
    rng = np.random.default_rng(0)
    image = render_image(random_attributes(rng), rng, size=(192, 320))
    assert (image.mode, image.size) == ("RGB", (192, 320))


def descriptor(image: Image.Image) -> np.ndarray:
    """A 4x4x4 colour histogram (Hellinger-normalised): a weight-free descriptor."""
    pixels = np.asarray(image.resize((64, 64))).reshape(-1, 3) // 64
    codes = pixels[:, 0] * 16 + pixels[:, 1] * 4 + pixels[:, 2]
    return np.sqrt(np.bincount(codes, minlength=64) / len(codes))


def test_same_colour_and_shape_look_alike() -> None:
    rng = np.random.default_rng(11)
    wins = 0
    for _ in range(12):
        attrs = random_attributes(rng)
        other = dict(attrs)
        other["color"] = next(c for c in ATTRIBUTES["color"] if c != attrs["color"])
        base = descriptor(render_image(attrs, rng))
        same = base @ descriptor(render_image(dict(attrs), rng))
        wins += same > base @ descriptor(render_image(other, rng))
    assert wins >= 11


def test_prompt_names_what_was_drawn() -> None:
    rng = np.random.default_rng(5)
    attrs: dict[str, str | int] = {
        "shape": "circle",
        "color": "red",
        "texture": "stripes",
        "background": "sky",
        "style": "flat",
        "count": 2,
    }
    prompts = [prompt_for(attrs, rng) for _ in range(40)]
    texts = [prompt for prompt, _ in prompts]
    assert any(word in text for text in texts for word in ("crimson", "scarlet", "ruby"))
    assert any(word in text for text in texts for word in ("orbs", "spheres", "discs"))
    assert any(":1." in text for text in texts)  # some weights
    assert Counter(tag for _, tags in prompts for tag in tags)["red"] > 30


def test_attributes_from_terms_understands_synonyms() -> None:
    rng = np.random.default_rng(1)
    terms = ["masterpiece", "two striped (crimson:1.2) orbs", "sunset background", "pixel art"]
    attrs = attributes_from_terms(terms, rng)
    assert attrs == {
        "shape": "circle",
        "color": "red",
        "texture": "stripes",
        "background": "sunset",
        "style": "pixelated",
        "count": 2,
    }


def test_attributes_from_terms_fills_the_rest_at_random() -> None:
    attrs = attributes_from_terms(["a blue sky background"], np.random.default_rng(2))
    assert attrs["background"] == "sky"
    assert attrs["color"] in ATTRIBUTES["color"]
    assert isinstance(attrs["count"], int)
    assert set(attrs) == set(ATTRIBUTES)


def test_prompts_round_trip_through_attributes() -> None:
    rng = np.random.default_rng(9)
    agree = 0
    for _ in range(50):
        attrs = random_attributes(rng)
        prompt, _ = prompt_for(attrs, rng)
        back = attributes_from_terms(prompt.split(","), rng)
        agree += back["color"] == attrs["color"] and back["shape"] == attrs["shape"]
    assert agree >= 45  # colour and shape are always named; the words vary
