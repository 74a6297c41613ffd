"""Dump readers: every format, image look-up, precedence, skips, and the root boundary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from indexer.dump import detect_format, iter_dump, normalise_prompt, normalise_tags
from indexer.errors import DumpError
from indexer.records import DumpRecord, SkippedEntry


def write_image(path: Path, colour: str = "red", **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF"}
    Image.new("RGB", (8, 8), colour).save(path, fmt[path.suffix.lower()], **options)
    return path


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


def read(root: Path) -> tuple[dict[str, DumpRecord], list[SkippedEntry]]:
    records: dict[str, DumpRecord] = {}
    skipped: list[SkippedEntry] = []
    for entry in iter_dump(root):
        if isinstance(entry, DumpRecord):
            assert entry.id not in records
            records[entry.id] = entry
        else:
            skipped.append(entry)
    return records, skipped


def reasons(skipped: list[SkippedEntry]) -> dict[str, str]:
    return {entry.path: entry.reason for entry in skipped}


def api_item(ident: Any, **fields: Any) -> dict[str, Any]:
    item = {
        "id": ident,
        "url": f"https://image.civitai.com/x/abc/width=512/{ident}-u.jpeg",
        "width": 8,
        "height": 8,
        "nsfwLevel": "None",
        "createdAt": "2024-03-01T10:00:00.000Z",
        "postId": 77,
        "username": "someone",
        "baseModel": "SDXL 1.0",
        "stats": {"likeCount": 3},
        "meta": {"prompt": "a red orb", "Model": "juggernaut"},
    }
    item.update(fields)
    return item


# ---- civitai API pages ---------------------------------------------------------------


@pytest.fixture
def api_dump(tmp_path: Path) -> Path:
    root = tmp_path / "dump"
    write_image(root / "101.jpeg")
    write_image(root / "images" / "102.png")
    write_image(root / "images" / "photo one.webp")  # found through the URL's file name
    write_image(root / "104.jpg")
    write_image(root / "105.PNG")
    items = [
        api_item(
            101,
            meta={"prompt": "  masterpiece,\n (red:1.2)   orb  ", "negativePrompt": "blurry"},
            tags=[{"id": 1, "name": "Orb"}, {"id": 2, "name": " Red "}, {"id": 3, "name": "orb"}],
        ),
        api_item(102, tags=["Circle", "RED", "circle"], nsfwLevel="Mature"),
        api_item(103, url="https://image.civitai.com/x/y/width=512/photo%20one.webp"),
        api_item(104, meta=None, nsfw=True, nsfwLevel=None),
        api_item(105, meta={"id": 9, "meta": {"prompt": "nested", "seed": 7}}, browsingLevel=8),
        api_item(106),  # no image anywhere
    ]
    write_json(root / "page_0001.json", {"items": items, "metadata": {"nextPage": None}})
    return root


def test_api_page_records(api_dump: Path) -> None:
    records, skipped = read(api_dump)
    assert sorted(records) == ["101", "102", "103", "104", "105"]
    assert reasons(skipped) == {"page_0001.json#5": "missing_image"}

    first = records["101"]
    assert first.image_path == api_dump / "101.jpeg"
    assert first.prompt == "masterpiece, (red:1.2) orb"
    assert first.negative_prompt == "blurry"
    assert first.tags == ("orb", "red")
    assert first.base_model == "SDXL 1.0"
    assert first.model_name is None
    assert first.created_at == "2024-03-01T10:00:00.000Z"
    assert first.username == "someone"
    assert first.stats == {"likeCount": 3}

    assert records["102"].image_path == api_dump / "images" / "102.png"
    assert records["102"].tags == ("circle", "red")
    assert records["102"].nsfw_level == 2
    assert records["102"].model_name == "juggernaut"
    assert records["103"].image_path == api_dump / "images" / "photo one.webp"
    assert records["104"].prompt is None
    assert records["104"].meta == {}
    assert records["104"].nsfw_level == 2
    assert records["105"].prompt == "nested"
    assert records["105"].meta == {"prompt": "nested", "seed": 7}
    assert records["105"].nsfw_level == 3
    assert records["105"].image_path.name == "105.PNG"


def test_claimed_images_are_not_read_again_as_bare(api_dump: Path) -> None:
    write_image(api_dump / "images" / "stray.png")
    records, _ = read(api_dump)
    assert sorted(records) == ["101", "102", "103", "104", "105", "images/stray"]


def test_json_in_a_folder_beside_images_finds_them_before_they_go_in_bare(tmp_path: Path) -> None:
    """pages/*.json and metadata/<id>.json beside images/ (images/ sorts first, so it is
    walked first): the images wait for the JSON below their parent, nearest images/ first."""
    root = tmp_path / "dump"
    write_image(root / "images" / "1.jpeg")
    write_image(root / "images" / "x-u.png")  # found through item 2's URL
    write_image(root / "images" / "3.webp")
    write_image(root / "images" / "4.png")  # shadowed: item 4's nearer images/ has one
    write_image(root / "pages" / "images" / "4.png", "blue")
    write_image(root / "images" / "stray.png")  # nobody's: bare
    page = [
        api_item(1, meta={"prompt": "page one"}),
        api_item(2, url="https://image.civitai.com/x/y/width=512/x-u.png"),
        api_item(4),
    ]
    write_json(root / "pages" / "page_0001.json", {"items": page})
    write_json(root / "metadata" / "2024" / "3.json", api_item(3, meta={"prompt": "deep"}))
    write_image(root / "images" / "5.png")
    write_json(root / "metadata" / "5.json", {"meta": {"prompt": "no id: the file's name"}})
    write_json(root / "metadata" / "6.json", {"meta": {"prompt": "no image anywhere"}})
    write_image(root / "images" / "8.png")
    write_json(root / "metadata" / "8.png.json", {"meta": {"prompt": "named as gallery-dl does"}})
    records, skipped = read(root)
    assert sorted(records) == ["1", "2", "3", "4", "5", "8", "images/4", "images/stray"]
    assert records["8"].prompt == "named as gallery-dl does"
    assert reasons(skipped) == {"metadata/6.json": "missing_image"}
    assert records["5"].prompt == "no id: the file's name"
    assert records["1"].image_path == root / "images" / "1.jpeg"
    assert records["1"].prompt == "page one"
    assert records["2"].image_path == root / "images" / "x-u.png"
    assert records["3"].image_path == root / "images" / "3.webp"
    assert records["3"].prompt == "deep"
    assert records["4"].image_path == root / "pages" / "images" / "4.png"
    assert records["images/4"].prompt is None  # read bare
    assert detect_format(root) == "civitai-api"


def test_a_match_beside_the_json_beats_one_in_an_images_folder_above(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "images" / "5.png", "blue")
    write_image(root / "sub" / "abc.png")  # item 5's, by its URL, beside its JSON
    write_json(root / "sub" / "page.json", {"items": [api_item(5, url="https://x/y/abc.png")]})
    records, skipped = read(root)
    assert not skipped and sorted(records) == ["5", "images/5"]
    assert records["5"].image_path == root / "sub" / "abc.png"


def test_a_file_two_records_name_is_read_once(tmp_path: Path) -> None:
    """A sidecar in images/ (walked first) and a page in pages/ beside it both name 7.png."""
    root = tmp_path / "dump"
    write_image(root / "images" / "7.png")
    write_json(root / "images" / "7.json", api_item(7))
    write_json(root / "pages" / "p.json", {"items": [api_item(70, url="https://x/y/7.png")]})
    records, skipped = read(root)
    assert sorted(records) == ["7"]
    assert reasons(skipped) == {"pages/p.json": "duplicate_id"}


def test_an_images_folder_that_cannot_be_listed_is_tried_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import indexer.dump as dump_module

    root = tmp_path / "dump"
    write_image(root / "images" / "1.png")
    write_json(root / "pages" / "p.json", {"items": [api_item(n) for n in range(50)]})
    scanned: list[str] = []
    real_scan = dump_module._scan

    def scan(directory: str, rel: str, root_path: str) -> Any:
        scanned.append(rel)
        if rel == "images":
            raise PermissionError(13, "Permission denied", directory)
        return real_scan(directory, rel, root_path)

    monkeypatch.setattr(dump_module, "_scan", scan)
    records, skipped = read(root)
    assert not records and scanned.count("images") <= 2  # once walked, once looked into
    assert reasons(skipped)["images"] == "unreadable"


def test_an_images_folder_is_only_looked_into_from_json_below_its_parent(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "a" / "images" / "7.png")
    write_json(root / "b" / "page.json", {"items": [api_item(7)]})  # a/images is not b's
    records, skipped = read(root)
    assert sorted(records) == ["a/images/7"]
    assert reasons(skipped) == {"b/page.json": "missing_image"}


def test_gallery_dl_civitai_metadata_is_read_from_its_nesting(tmp_path: Path) -> None:
    """gallery-dl's civitai extractor writes civitai/<user>/images/<file id>.<ext> and, with
    --write-metadata, <file id>.<ext>.json: the API's image under "file", the uploader under
    "user", generation data and tags at the top level (images) or in "file" (posts)."""
    root = tmp_path / "dump"
    folder = root / "civitai" / "alice" / "images"
    write_image(folder / "41234500.png")
    write_image(folder / "41234501.jpeg")
    image = {
        "id": 41234500,
        "url": "5c4efa68-bb58-47c5-a716-98cd0f51f047",  # tRPC gives the uuid alone
        "nsfwLevel": 16,
        "createdAt": "2025-01-02T03:04:05.000Z",
        "baseModel": "SDXL 1.0",
        "stats": {"likeCountAllTime": 4},
        "user": None,
    }
    write_json(
        folder / "41234500.png.json",
        {
            "file": image,
            "user": {"id": 9, "username": "alice"},
            "generation": {"type": "image", "meta": {"prompt": "a knight", "Model": "jugg"}},
            "tags": [{"id": 1, "name": "Knight", "type": "Label"}],
            "url": "https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/5c4e/original=true/41234500.png",
            "category": "civitai",
            "subcategory": "image",
        },
    )
    post_image = {"id": 41234501, "nsfwLevel": 4, "tags": ["castle"], "generation": None}
    write_json(
        folder / "41234501.jpeg.json",
        {"num": 1, "file": post_image, "post": {"id": 5}, "user": {"username": "alice"}},
    )
    records, skipped = read(root)
    assert not skipped and sorted(records) == ["41234500", "41234501"]
    knight = records["41234500"]
    assert (knight.nsfw_level, knight.username, knight.base_model) == (4, "alice", "SDXL 1.0")
    assert (knight.prompt, knight.model_name, knight.tags) == ("a knight", "jugg", ("knight",))
    assert knight.created_at == "2025-01-02T03:04:05.000Z"
    assert knight.url is not None and knight.url.endswith("/original=true/41234500.png")
    assert knight.stats == {"likeCountAllTime": 4}
    assert knight.bare_id == "civitai/alice/images/41234500"  # an item indexed bare is renamed
    castle = records["41234501"]
    assert (castle.nsfw_level, castle.tags, castle.prompt) == (2, ("castle",), None)  # 4: Mature


def test_an_item_whose_file_is_a_video_or_bmp_is_skipped_once_as_unsupported(
    tmp_path: Path,
) -> None:
    root = tmp_path / "dump"
    write_image(root / "images" / "1.png")
    (root / "images" / "2.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (root / "images" / "clip.webm").write_bytes(b"\x1aE\xdf\xa3")
    (root / "images" / "3.bmp").write_bytes(b"BM")
    (root / "images" / "stray.mov").write_bytes(b"")
    items = [api_item(1), api_item(2), api_item(3), api_item(4, url="https://x/y/clip.webm")]
    write_json(root / "page.json", {"items": items})
    records, skipped = read(root)
    assert sorted(records) == ["1"]
    assert reasons(skipped) == {
        "page.json#1": "unsupported_format",
        "page.json#2": "unsupported_format",
        "page.json#3": "unsupported_format",
        "images/stray.mov": "unsupported_format",  # nobody's: reported by the bare pass
    }


def test_a_nested_meta_that_is_null_is_no_meta(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "1.png")
    write_json(root / "page.json", {"items": [api_item(1, meta={"id": 1, "meta": None})]})
    records, _ = read(root)
    assert records["1"].meta == {} and records["1"].prompt is None


def test_nsfw_levels_from_civitai_and_other_ratings(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    cases = {
        # civitai's documented example: nsfw is true for Soft images too
        "soft": ({"nsfw": True, "nsfwLevel": "Soft", "browsingLevel": 2}, 1),
        "none": ({"nsfw": False, "nsfwLevel": "None", "browsingLevel": 1}, 0),
        "flag-r": ({"nsfwLevel": 4}, 2),  # the newer API's numeric levels (bit flags)
        "flag-xxx": ({"nsfwLevel": 16}, 4),
        "only-bool": ({"nsfwLevel": None, "nsfw": True}, 2),
        "unrated-flagged": ({"nsfwLevel": 0, "nsfw": True}, 2),  # 0: not rated yet
        "superscript": ({"nsfwLevel": "²"}, 4),  # a digit to str.isdigit, not to int()
        "empty-level": ({"nsfwLevel": " ", "nsfw": True}, 2),
        "mixed": ({"nsfwLevel": "Soft", "browsingLevel": 8}, 3),  # the highest level field
        "booru": ({"nsfwLevel": "questionable"}, 2),
        "spelled": ({"nsfwLevel": "PG 13"}, 1),
        "blocked": ({"nsfwLevel": "Blocked"}, 4),
        "unknown": ({"nsfwLevel": "spicy"}, 4),  # unreadable: a safe filter leaves it out
    }
    items = []
    for name, (fields, _) in cases.items():
        write_image(root / f"{name}.png")
        items.append(api_item(name, **{"nsfwLevel": None, **fields}))
    write_json(root / "page.json", {"items": items})
    records, _ = read(root)
    assert {name: records[name].nsfw_level for name in cases} == {
        name: level for name, (_, level) in cases.items()
    }


def test_json_with_a_bom_utf16_or_nan_is_read(tmp_path: Path) -> None:
    """What Windows tools and Python's json.dump write, and orjson alone refuses."""
    root = tmp_path / "dump"
    for name in ("bom", "utf16", "nan"):
        write_image(root / f"{name}.png")
    page = {"items": [api_item("bom", nsfwLevel="X")]}
    (root / "bom-page.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(page).encode())
    page = {"items": [api_item("utf16", nsfwLevel="X")]}
    (root / "utf16-page.json").write_bytes(json.dumps(page).encode("utf-16"))
    nan = api_item("nan", nsfwLevel="X", meta={"prompt": "a red orb", "cfgScale": float("nan")})
    # what else the standard library reads: Infinity where a number goes, half an emoji
    odd = api_item("odd", nsfwLevel="X", width=float("inf"), meta={"prompt": "a cat \ud83d"})
    write_image(root / "odd.png")
    (root / "nan-page.json").write_text(json.dumps({"items": [nan, odd]}))
    records, skipped = read(root)
    assert sorted(records) == ["bom", "nan", "odd", "utf16"] and not skipped
    assert {r.nsfw_level for r in records.values()} == {3}
    assert records["nan"].prompt == "a red orb"
    assert records["odd"].prompt == "a cat \ufffd"


def test_json_list_and_jsonl_of_items(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "1.png")
    write_image(root / "2.png")
    write_image(root / "3.png")
    write_json(root / "list.json", [api_item(1), "not an object"])
    lines = [json.dumps(api_item(2)), "{broken", "", json.dumps(api_item(3))]
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    records, skipped = read(root)
    assert sorted(records) == ["1", "2", "3"]
    assert reasons(skipped) == {"items.jsonl:2": "bad_json", "list.json#1": "bad_item"}


def test_jsonl_content_in_a_json_file(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "1.png")
    write_image(root / "2.png")
    (root / "dump.json").write_text(json.dumps(api_item(1)) + "\n" + json.dumps(api_item(2)))
    records, skipped = read(root)
    assert sorted(records) == ["1", "2"]
    assert skipped == []


def test_duplicate_ids_first_wins(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "7.png")
    write_json(root / "a.json", {"items": [api_item(7, meta={"prompt": "first"})]})
    write_json(root / "b.json", {"items": [api_item("7", meta={"prompt": "second"})]})
    records, skipped = read(root)
    assert records["7"].prompt == "first"
    assert reasons(skipped) == {"b.json": "duplicate_id"}


def test_bad_and_unknown_json_do_not_stop_the_run(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "1.png")
    (root / "a_bad.json").write_text("{ not json")
    write_json(root / "b_unknown.json", {"hello": "world"})
    write_json(root / "c_numbers.json", [1, 2])
    write_json(root / "d_page.json", {"items": [api_item(1)]})
    records, skipped = read(root)
    assert list(records) == ["1"]
    assert reasons(skipped) == {
        "a_bad.json": "bad_json",
        "b_unknown.json": "unknown_json",
        "c_numbers.json#0": "bad_item",
        "c_numbers.json#1": "bad_item",
    }


# ---- flat records, sidecars, bare images ---------------------------------------------


def flat(ident: Any, **fields: Any) -> dict[str, Any]:
    record = {
        "image_id": ident,
        "url": f"https://cdn.example.com/{ident}.png",
        "created_at": "2023-05-05",
        "prompt": "a  blue\tcube",
        "model": "sd15",
        "original_level": "X",
        "tags": "Cube, blue , cube,, ",
    }
    record.update(fields)
    return record


def test_flat_records_single_list_and_jsonl(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    for ident in ("f1", "f2", "f3", "f4"):
        write_image(root / f"{ident}.png")
    write_json(root / "one.json", flat("f1"))
    write_json(root / "many.json", [flat("f2"), flat("f3")])
    (root / "rows.jsonl").write_text(json.dumps(flat("f4")) + "\n")
    records, skipped = read(root)
    assert skipped == []
    assert sorted(records) == ["f1", "f2", "f3", "f4"]
    record = records["f1"]
    assert record.prompt == "a blue cube"
    assert record.tags == ("cube", "blue")
    assert record.nsfw_level == 3
    assert record.model_name == "sd15"
    assert record.created_at == "2023-05-05"
    assert record.url == "https://cdn.example.com/f1.png"


def test_flat_record_with_relative_url(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "pics" / "2024" / "x.png")
    write_json(root / "rows.json", [flat(1, url="pics/2024/x.png")])
    records, skipped = read(root)
    assert skipped == []
    assert records["1"].image_path == root / "pics" / "2024" / "x.png"


def test_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "123.jpeg")
    write_json(root / "123.json", {"meta": {"prompt": "sidecar prompt"}, "tags": ["A"]})
    write_image(root / "sub" / "cat.png")
    write_json(root / "sub" / "cat.json", api_item(900, url=None, nsfwLevel="Soft"))
    records, skipped = read(root)
    assert skipped == []
    assert records["123"].prompt == "sidecar prompt"
    assert records["123"].tags == ("a",)
    assert records["123"].image_path == root / "123.jpeg"
    assert records["900"].image_path == root / "sub" / "cat.png"
    assert records["900"].nsfw_level == 1


def test_sidecars_named_after_the_whole_file_as_gallery_dl_writes_them(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "civitai_4242.jpeg")
    write_json(root / "civitai_4242.jpeg.json", api_item(4242, url=None, nsfwLevel="X"))
    write_image(root / "art" / "x.png")
    write_json(root / "art" / "x.png.json", {"meta": {"prompt": "no id here"}})
    records, skipped = read(root)
    # without an id, the one the image would have bare: directory included (a/x, b/x differ)
    assert skipped == [] and sorted(records) == ["4242", "art/x"]
    assert records["4242"].image_path == root / "civitai_4242.jpeg"
    assert (records["4242"].nsfw_level, records["4242"].prompt) == (3, "a red orb")
    assert records["art/x"].image_path == root / "art" / "x.png"
    assert records["art/x"].prompt == "no id here"
    assert detect_format(root) == "sidecar"


def test_api_page_wins_over_sidecar_and_bare(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "5.png")
    write_json(root / "5.json", {"id": 5, "meta": {"prompt": "sidecar"}})
    write_json(root / "page.json", {"items": [api_item(5, meta={"prompt": "page"})]})
    records, skipped = read(root)
    assert records == {"5": records["5"]}
    assert records["5"].prompt == "page"
    assert reasons(skipped) == {"5.json": "duplicate_id"}


def a1111_png(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return write_image(path, pnginfo=info)


def test_bare_images_with_embedded_metadata(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    a1111_png(
        root / "gen" / "one.png",
        "a green  star\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
        "Seed: 5, Model: dreamshaper",
    )
    comfy = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "comfy hexagon"}}}
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(comfy))
    write_image(root / "gen" / "two.png", pnginfo=info)
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "exif ring".encode("utf-16-be")
    write_image(root / "three.jpg", exif=exif.tobytes())
    write_image(root / "plain.gif")
    records, skipped = read(root)
    assert skipped == []
    assert sorted(records) == ["gen/one", "gen/two", "plain", "three"]
    one = records["gen/one"]
    assert (one.prompt, one.negative_prompt, one.model_name) == (
        "a green star",
        "ugly",
        "dreamshaper",
    )
    assert one.meta["Steps"] == 20
    assert records["gen/two"].prompt == "comfy hexagon"
    assert records["three"].prompt == "exif ring"
    assert records["plain"].prompt is None


def test_a_url_file_name_is_found_decoded_or_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "images" / "my%20pic.jpeg")  # saved without decoding the URL
    write_image(root / "images" / "your pic.jpeg")
    items = [
        api_item(1, url="https://image.civitai.com/x/width=512/my%20pic.jpeg"),
        api_item(2, url="https://image.civitai.com/x/width=512/your%20pic.jpeg"),
    ]
    write_json(root / "page.json", {"items": items})
    records, skipped = read(root)
    assert skipped == [] and sorted(records) == ["1", "2"]
    assert records["1"].image_path.name == "my%20pic.jpeg"
    assert records["2"].image_path.name == "your pic.jpeg"


def test_bare_images_sharing_a_stem_are_both_read(tmp_path: Path) -> None:
    """x.gif beside x.webp: two images (the second was skipped as a duplicate id)."""
    root = tmp_path / "dump"
    write_image(root / "art" / "x.gif", "red")
    write_image(root / "art" / "x.webp", "blue")
    records, skipped = read(root)
    assert skipped == []
    # both named in full: neither id depends on which file the walk met first
    assert sorted(records) == ["art/x.gif", "art/x.webp"]
    assert records["art/x.gif"].image_path.name == "x.gif"
    assert records["art/x.webp"].image_path.name == "x.webp"


def test_an_item_without_meta_takes_the_prompt_its_file_carries(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    a1111_png(
        root / "201.png",
        "a violet moon\nNegative prompt: dull\nSteps: 9, Sampler: Euler a, CFG scale: 7, "
        "Seed: 5, Model: juggernaut",
    )
    write_image(root / "202.png")
    write_image(root / "203.png")
    items = [
        api_item(201, meta=None),
        api_item(202, meta=None),
        api_item(203, meta={"prompt": "from the page"}),
    ]
    write_json(root / "page.json", {"items": items})
    records, _ = read(root)
    first = records["201"]
    assert (first.prompt, first.negative_prompt, first.model_name) == (
        "a violet moon",
        "dull",
        "juggernaut",
    )
    assert first.meta["Steps"] == 9
    assert records["202"].prompt is None and records["202"].meta == {}
    assert records["203"].prompt == "from the page"  # the page's own prompt comes first


def test_bare_unsupported_and_hidden_files(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "ok.png")
    Image.new("RGB", (4, 4)).save(root / "old.bmp")
    write_image(root / ".hidden.png")
    write_image(root / ".cache" / "x.png")
    write_json(root / ".meta.json", {"nope": 1})
    (root / "truth.jsonl").write_text('{"id": "1", "shape": "star"}\n')  # the sample's truth
    (root / "notes.txt").write_text("ignored")
    records, skipped = read(root)
    assert list(records) == ["ok"]
    assert reasons(skipped) == {"old.bmp": "unsupported_format"}


def test_order_is_deterministic_and_depth_first(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    for rel in ("b/2.png", "a/z/1.png", "a/3.png", "c.png", "a/y.png"):
        write_image(root / rel)
    ids = [e.id for e in iter_dump(root) if isinstance(e, DumpRecord)]
    assert ids == ["c", "a/3", "a/y", "a/z/1", "b/2"]
    assert ids == [e.id for e in iter_dump(root) if isinstance(e, DumpRecord)]


def test_iter_dump_is_lazy_and_checks_the_root(tmp_path: Path) -> None:
    with pytest.raises(DumpError):
        iter_dump(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DumpError):
        iter_dump(tmp_path / "file")
    write_image(tmp_path / "d" / "a.png")
    assert isinstance(next(iter_dump(tmp_path / "d")), DumpRecord)


# ---- the root boundary ---------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the dump with an image and a JSON page that must never be read."""
    place = tmp_path / "outside"
    write_image(place / "secret.png")
    write_image(place / "66.png")
    write_json(place / "page.json", {"items": [api_item(66)]})
    return place


def test_references_that_leave_the_root(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "dump"
    root.mkdir()
    rows = [
        flat("r1", url="../outside/secret.png"),
        flat("r2", url=str(outside / "secret.png")),
        flat("r3", url="file:///etc/passwd"),
        flat("r4", url="https://cdn.example.com/a/%2e%2e%2fsecret.png"),
        flat("../outside/secret", url="https://cdn.example.com/nothing.png"),
        flat("r6", url="sub/../../outside/secret.png"),
    ]
    write_json(root / "rows.json", rows)
    records, skipped = read(root)
    assert records == {}
    assert [entry.reason for entry in skipped] == ["outside_root"] * len(rows)


def test_symlinks_leaving_the_root_are_not_read(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "inside.png")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    os.symlink(outside / "page.json", root / "linked.json")
    os.symlink(root / "inside.png", root / "alias.png")  # stays inside: fine
    os.symlink(root, root / "loop")  # a directory inside: not followed, no cycle
    write_json(root / "page.json", {"items": [api_item("link")]})
    records, skipped = read(root)
    assert sorted(records) == ["alias", "inside"]
    assert records["alias"].image_path == root / "inside.png"
    assert reasons(skipped) == {
        "linkdir": "outside_root",
        "linked.json": "outside_root",
        "page.json": "outside_root",
        "link.png": "outside_root",
    }
    for record in records.values():
        assert record.image_path.is_relative_to(root)


def test_root_given_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write_image(real / "a.png")
    os.symlink(real, tmp_path / "alias")
    records, _ = read(tmp_path / "alias")
    assert records["a"].image_path == real / "a.png"


# ---- format detection and helpers ----------------------------------------------------


def test_detect_format(tmp_path: Path, api_dump: Path) -> None:
    assert detect_format(api_dump) == "civitai-api"
    sidecar = tmp_path / "sidecar"
    write_image(sidecar / "1.png")
    write_json(sidecar / "1.json", {"meta": {"prompt": "x"}})
    assert detect_format(sidecar) == "sidecar"
    flat_root = tmp_path / "flat"
    (flat_root).mkdir()
    (flat_root / "rows.jsonl").write_text(json.dumps(flat(1)) + "\n")
    assert detect_format(flat_root) == "flat"
    bare = tmp_path / "bare"
    write_image(bare / "x" / "1.png")
    assert detect_format(bare) == "bare"
    write_image(sidecar / "loose" / "2.png")
    assert detect_format(sidecar) == "mixed"
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") == "empty"


def test_normalisers() -> None:
    assert normalise_prompt("  a\n\n(b:1.2),\tc ") == "a (b:1.2), c"
    assert normalise_prompt("   ") is None
    assert normalise_prompt(None) is None
    assert normalise_tags([{"name": "A  B"}, "a b", {"id": 3}, 5, "C"]) == ("a b", "c")
    assert normalise_tags("x, y,x") == ("x", "y")
    assert normalise_tags(None) == ()


def test_record_fields_tolerate_odd_types(tmp_path: Path) -> None:
    root = tmp_path / "dump"
    write_image(root / "1.png")
    odd = api_item(1.0, width="wide", height=True, stats=[1], createdAt=5, username=None, tags="a")
    write_json(root / "page.json", {"items": [odd, api_item(True), api_item({"x": 1})]})
    records, skipped = read(root)
    record = records["1"]
    assert record.stats == {}
    assert record.created_at == "5"
    assert record.tags == ("a",)
    assert [entry.reason for entry in skipped] == ["bad_item", "bad_item"]
