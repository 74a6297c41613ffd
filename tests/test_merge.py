"""`lookalike merge`: shards of a dump merged into one catalog equal a single run over it."""

from __future__ import annotations

import json
import shutil
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from indexer import merge
from indexer.catalog import Catalog, NewItem
from indexer.dump import iter_dump
from indexer.errors import MergeError
from indexer.merge import merge_catalogs
from indexer.pipeline import IndexReport, PipelineConfig, Shard, index_dump
from indexer.records import DumpRecord
from indexer.sample_dump import write_sample_dump
from tests.cli_helpers import run_cli
from tests.fakes import fake_encoders, specs

SHARDS = 3


def shard_of(item_id: str) -> int:
    return next(i for i in range(SHARDS) if Shard(i, SHARDS).owns(item_id))


def truth(dump: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (dump / "truth.jsonl").read_text().splitlines()]


def image_of(dump: Path, item_id: str) -> Path:
    return next(
        e.image_path for e in iter_dump(dump) if isinstance(e, DumpRecord) and e.id == item_id
    )


def add_copy(dump: Path, page: str, of_id: str, avoid_shard: int) -> str:
    """Add an API page holding one item whose image is a byte copy of ``of_id``'s, under a new
    id owned by another shard than ``avoid_shard``; the new id."""
    source = image_of(dump, of_id)
    new_id = next(str(n) for n in range(9_000_000, 9_000_100) if shard_of(str(n)) != avoid_shard)
    copy = dump / "images" / f"copy-{new_id}{source.suffix}"
    copy.write_bytes(source.read_bytes())
    item = {
        "id": new_id,
        "url": f"https://example.invalid/{copy.name}",
        "meta": {"prompt": f"a copy of {of_id}"},
        "tags": ["copy"],
    }
    (dump / page).write_text(json.dumps({"items": [item]}))
    return new_id


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample dump plus two copies of images under ids of other shards: one read before
    its original (its page sorts first) and one after."""
    root = tmp_path_factory.mktemp("merge_dump")
    write_sample_dump(root, count=60, seed=3)
    rows = truth(root)
    plain = [r["id"] for r in rows if not r["broken"] and r["duplicate_of"] is None]
    aliased = {r["duplicate_of"] for r in rows if r["duplicate_of"] is not None}
    # The early copy's original has an alias of its own, which must follow it to the copy.
    early_of = next((i for i in plain if i in aliased), plain[0])
    add_copy(root, "page_0000.json", early_of, shard_of(early_of))
    late_of = next(i for i in plain if i != early_of and i not in aliased)
    add_copy(root, "page_9999.json", late_of, shard_of(late_of))
    return root


def index(dump: Path, target: Path, shard: Shard | None = None) -> IndexReport:
    config = PipelineConfig(batch_size=8, progress=False, shard=shard)
    with Catalog.create_or_open(target, specs()) as catalog:
        report = index_dump(dump, catalog, fake_encoders(), config)
        # Alignment rows as a CLIP catalog would have them (NaN: no prompt to score).
        keys = [item.key for item in catalog.iter_items()]
        ids = [item.id for item in catalog.iter_items()]
        scores = [np.nan if zlib.crc32(i.encode()) % 5 == 0 else len(i) * 1.5 for i in ids]
        catalog.set_alignment(keys, scores)
    return report


@pytest.fixture(scope="module")
def built(dump: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dump indexed whole and as SHARDS parts (never written to by the tests)."""
    root = tmp_path_factory.mktemp("merge_built")
    index(dump, root / "whole")
    for i in range(SHARDS):
        index(dump, root / f"part{i}", Shard(i, SHARDS))
    return {"whole": root / "whole", **{f"part{i}": root / f"part{i}" for i in range(SHARDS)}}


def parts_of(built: dict[str, Path], tmp_path: Path) -> list[Path]:
    """Fresh copies of the parts (a merge migrates and reads them; tests may also break them)."""
    copies = []
    for i in range(SHARDS):
        copy = tmp_path / f"part{i}"
        shutil.copytree(built[f"part{i}"], copy)
        copies.append(copy)
    return copies


def snapshot(path: Path) -> dict[str, Any]:
    """Everything a merge must reproduce, by id (keys differ between catalogs)."""
    with Catalog.open(path) as catalog:
        items = list(catalog.iter_items())
        keys = [item.key for item in items]
        alignment = catalog.alignment_rows(keys)
        return {
            "items": {
                item.id: (
                    item.file,
                    item.content_hash,
                    item.width,
                    item.height,
                    item.prompt,
                    item.negative_prompt,
                    item.tags,
                    item.nsfw_level,
                    item.base_model,
                    item.model_name,
                    item.created_at,
                    item.username,
                    item.url,
                    item.stats,
                    item.meta,
                    item.source,
                    catalog.item_files([item.key])[item.key],
                    alignment.get(item.key, "absent"),
                )
                for item in items
            },
            "vectors": {
                space: dict(zip([i.id for i in items], catalog.vectors(space, keys), strict=True))
                for space in catalog.spaces
            },
            "duplicates": {row[0]: row[1:] for row in catalog.iter_duplicates()},
            "positions": catalog.dump_positions(
                [item.id for item in items] + [row[0] for row in catalog.iter_duplicates()]
            ),
            "skipped": catalog.skipped_files(),
            "counts": {space: len(index) for space, index in catalog.indexes.items()},
        }


def assert_same(merged: dict[str, Any], whole: dict[str, Any]) -> None:
    assert merged["items"].keys() == whole["items"].keys()
    for item_id, facts in whole["items"].items():
        assert merged["items"][item_id] == facts, item_id
    for space, vectors in whole["vectors"].items():
        for item_id, vector in vectors.items():
            np.testing.assert_allclose(merged["vectors"][space][item_id], vector, atol=1e-6)
    assert merged["duplicates"] == whole["duplicates"]
    assert merged["skipped"] == whole["skipped"]
    assert merged["positions"] == whole["positions"]
    assert merged["counts"] == whole["counts"]


def test_every_run_records_where_ids_stand_in_the_dump(dump: Path, built: dict[str, Path]) -> None:
    order = {e.id: n for n, e in enumerate(iter_dump(dump)) if isinstance(e, DumpRecord)}
    for name in ("whole", *(f"part{i}" for i in range(SHARDS))):
        recorded = snapshot(built[name])["positions"]
        assert recorded and recorded == {i: order[i] for i in recorded}, name


def test_merged_shards_equal_a_single_run(
    dump: Path, built: dict[str, Path], tmp_path: Path
) -> None:
    whole = snapshot(built["whole"])
    parts = [snapshot(p) for p in parts_of(built, tmp_path)]
    # The fixture has what the merge is for: bytes that two shards each store as an item,
    # the single run's item first in dump order in one case and second in the other.
    across = [
        alias
        for alias, (of, *_rest) in whole["duplicates"].items()
        if shard_of(alias) != shard_of(of) and alias in parts[shard_of(alias)]["items"]
    ]
    assert len(across) >= 2
    assert any(alias.startswith("9") for alias in across)  # the late copy
    assert any(of.startswith("9") for of, *_ in (whole["duplicates"][a] for a in across))
    assert whole["skipped"] and any(a for a in whole["duplicates"] if a not in across)

    report = merge_catalogs(
        parts_of(built, tmp_path / "again"), tmp_path / "merged", progress=False
    )

    assert_same(snapshot(tmp_path / "merged"), whole)
    assert report.items == len(whole["items"])
    assert report.across_parts == len(across)
    assert sum(report.skipped.values()) == len(whole["skipped"])


def test_merge_cli_then_reindex_finds_nothing_new(
    dump: Path,
    built: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    parts = [str(p) for p in parts_of(built, tmp_path)]
    merged = tmp_path / "merged"
    assert run_cli(monkeypatch, "merge", *parts, "--catalog", str(merged), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parts"] == SHARDS and report["items"] > 0
    before = snapshot(merged)

    again = index(dump, merged)

    assert again.indexed == 0 and again.metadata_updated == 0
    assert again.unchanged == len(before["items"])
    assert again.duplicates == len(before["duplicates"])
    assert_same(snapshot(merged), before)

    assert run_cli(monkeypatch, "merge", *parts, "--catalog", str(merged)) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"merged {SHARDS} parts: items 0, unchanged {len(before['items'])}")


def test_an_interrupted_merge_completes_when_run_again(
    built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = parts_of(built, tmp_path)
    merged = tmp_path / "merged"
    monkeypatch.setattr(merge, "BATCH", 8)
    # Killed after the second batch of items, then after the first batch of aliases.
    for step, after in (("_write_items", 2), ("_write_aliases", 1)):
        real = getattr(merge, step)
        calls = {"n": 0}

        def failing(*args: Any, real: Any = real, calls: dict = calls, after: int = after) -> Any:
            result = real(*args)
            calls["n"] += 1
            if calls["n"] == after:
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(merge, step, failing)
        with pytest.raises(KeyboardInterrupt):
            merge_catalogs(parts, merged, progress=False)
        monkeypatch.setattr(merge, step, real)

    merge_catalogs(parts, merged, progress=False)

    assert_same(snapshot(merged), snapshot(built["whole"]))
    rerun = merge_catalogs(parts, merged, progress=False)
    assert rerun.items == 0 and rerun.unchanged == len(snapshot(built["whole"])["items"])


def test_merging_in_steps_equals_merging_at_once(built: dict[str, Path], tmp_path: Path) -> None:
    parts = parts_of(built, tmp_path)
    whole = snapshot(built["whole"])
    # The early copy's part goes last: the target then holds its original (and the original's
    # alias) as an item, which must turn into an alias of the copy.
    early = next(of for of, *_ in whole["duplicates"].values() if of.startswith("9"))
    order = sorted(range(SHARDS), key=lambda i: i == shard_of(early))
    merged = tmp_path / "merged"
    for i in order:
        merge_catalogs([parts[i]], merged, progress=False)

    assert_same(snapshot(merged), whole)


def test_an_existing_target_is_upserted_by_id(
    dump: Path, built: dict[str, Path], tmp_path: Path
) -> None:
    # The target holds the dump as it was: one image has since changed.
    old = tmp_path / "old-dump"
    shutil.copytree(dump, old)
    rows = truth(dump)
    aliased = {r["duplicate_of"] for r in rows}
    changed = next(
        r["id"]
        for r in rows
        if not r["broken"] and r["duplicate_of"] is None and r["id"] not in aliased
    )
    path = image_of(old, changed)
    Image.new("RGB", (48, 48), (250, 10, 10)).save(path, format=Image.open(path).format)
    merged = tmp_path / "merged"
    index(old, merged)
    with Catalog.open(merged) as catalog:
        old_hash = catalog.item(changed).content_hash  # type: ignore[union-attr]

    merge_catalogs(parts_of(built, tmp_path), merged, progress=False)

    result, whole = snapshot(merged), snapshot(built["whole"])
    assert result["items"][changed] == whole["items"][changed]
    assert result["items"][changed][1] != old_hash
    np.testing.assert_allclose(
        result["vectors"]["visual"][changed], whole["vectors"]["visual"][changed], atol=1e-6
    )
    # Items and aliases come from the parts; the old dump's files were other paths.
    assert result["items"].keys() == whole["items"].keys()
    assert result["duplicates"] == whole["duplicates"]


def test_feedback_and_generated_items_are_carried_over(
    built: dict[str, Path], tmp_path: Path
) -> None:
    parts = parts_of(built, tmp_path)
    with Catalog.open(parts[1]) as part:
        part.record_feedback("s1", "u1", [("e1", "2000039", 1200.0), ("e2", "x", 300.0)])
        png = parts[1] / "generated" / "gen-1.png"
        png.parent.mkdir()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(png)
        record = DumpRecord(id="gen-1", image_path=png, prompt="a made image")
        made = NewItem(
            record=record,
            file="generated/gen-1.png",
            content_hash="made",
            file_size=png.stat().st_size,
            file_mtime_ns=png.stat().st_mtime_ns,
            width=64,
            height=64,
            source="generated",
            extra_meta={"generated": {"backend": "sample"}},
        )
        vectors = {
            s: np.ones((1, spec.dim), np.float32) / spec.dim**0.5 for s, spec in specs().items()
        }
        part.add([made], vectors)
    merged = tmp_path / "merged"

    report = merge_catalogs(parts, merged, progress=False)
    merge_catalogs(parts, merged, progress=False)  # events are not stored twice

    assert report.feedback == 2
    with Catalog.open(merged) as catalog:
        assert catalog.feedback_rows() == [
            ("s1", "u1", "2000039", 1200.0),
            ("s1", "u1", "x", 300.0),
        ]
        item = catalog.item("gen-1")
        assert item is not None and item.generated and item.meta["generated"]["backend"] == "sample"
        assert (merged / "generated" / "gen-1.png").read_bytes() == png.read_bytes()


def run_merge_cli(monkeypatch: pytest.MonkeyPatch, *args: Path) -> int:
    *parts, target = args
    return run_cli(monkeypatch, "merge", *map(str, parts), "--catalog", str(target))


def test_merge_refuses_what_it_cannot_merge(
    dump: Path,
    built: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    p0, p1, p2 = parts_of(built, tmp_path)

    def refused(*args: Path) -> str:
        assert run_merge_cli(monkeypatch, *args) == 2
        return capsys.readouterr().err

    assert "is also one of the parts" in refused(p0, p1, p1)
    (tmp_path / "empty").mkdir()
    assert "No catalog at" in refused(p0, tmp_path / "empty", tmp_path / "m1")

    other = tmp_path / "other-encoders"
    Catalog.create_or_open(other, {"visual": specs()["visual"]}).close()
    assert "other encoders" in refused(p0, other, tmp_path / "m2")
    assert "other encoders" in refused(p0, p1, other)

    # The same id with other bytes: a part indexed from a changed copy of the dump.
    changed_dump = tmp_path / "changed-dump"
    shutil.copytree(dump, changed_dump)
    victim = next(r["id"] for r in truth(dump) if not r["broken"] and shard_of(r["id"]) == 0)
    path = image_of(changed_dump, victim)
    Image.new("RGB", (40, 40), (0, 90, 0)).save(path, format=Image.open(path).format)
    index(changed_dump, tmp_path / "changed", Shard(0, SHARDS))
    message = refused(p0, tmp_path / "changed", tmp_path / "m3")
    assert f"id {victim}:" in message and "different image bytes" in message

    # A part indexed before dump positions were recorded.
    with sqlite3.connect(p2 / "catalog.sqlite") as db:
        db.execute("DELETE FROM dump_positions")
    assert "no dump positions" in refused(p0, p1, p2, tmp_path / "m4")

    for name in ("m1", "m2", "m3", "m4"):
        assert not (tmp_path / name).exists()
    with pytest.raises(MergeError):
        merge_catalogs([], tmp_path / "m5", progress=False)
