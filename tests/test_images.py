"""Safe decoding (every reason code) and embedded generation metadata."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from indexer.errors import ImageRejected
from indexer.images import (
    ImageLimits,
    count_gif_frames,
    decode_image,
    decode_user_comment,
    parse_a1111_parameters,
    read_embedded_metadata,
    sniff_format,
)
from tests.hostile_corpus import encode, png_header_only

RED = (220, 20, 30)


def rejected(source: bytes | Path, **kwargs: object) -> str:
    with pytest.raises(ImageRejected) as caught:
        decode_image(source, **kwargs)  # type: ignore[arg-type]
    assert str(caught.value)  # every rejection carries a human message
    return caught.value.reason


def animation(fmt: str, frames: int) -> bytes:
    colours = [(i * 50 % 256, 200, 10) for i in range(frames)]
    images = [Image.new("RGB", (16, 12), c) for c in colours]
    images[0] = Image.new("RGB", (16, 12), RED)
    return encode(images[0], fmt, save_all=True, append_images=images[1:])


# ---- accepted images -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(encode(Image.new("RGB", (40, 30), RED), fmt))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_decodes_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encode(Image.new("RGB", (5, 7), RED), "PNG"))
    assert decode_image(path).size == (5, 7)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    image = decode_image(animation(fmt, 4))
    red, green, _ = image.getpixel((5, 5))  # type: ignore[misc]
    assert red > 180 and green < 60


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (20, 10), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image = decode_image(encode(source, "PNG", exif=exif.tobytes()))
    assert image.size == (10, 20)
    assert image.getpixel((5, 2))[0] > 200  # type: ignore[index]  # red is now on top


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.getpixel((1, 1)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("LA", (4, 4), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
        (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), "PNG", (255, 255, 255)),
        (Image.new("I;16", (4, 4), 32896), "PNG", (128, 128, 128)),
    ],
)
def test_other_modes_become_8_bit_rgb(
    image: Image.Image, fmt: str, expected: tuple[int, int, int]
) -> None:
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((1, 1)) == expected


def test_palette_transparency_becomes_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    decoded = decode_image(encode(image, "PNG", transparency=0))
    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb() -> None:
    decoded = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    red, green, blue = decoded.getpixel((4, 4))  # type: ignore[misc]
    assert red > 200 and green < 50 and blue < 50


def test_draft_decodes_large_jpeg_at_reduced_scale() -> None:
    data = encode(Image.new("RGB", (1800, 1000), RED), "JPEG")
    image = decode_image(data, draft_size=224)
    assert min(image.size) >= 224
    assert image.size[0] < 1800
    assert image.info["source_size"] == (1800, 1000)  # the file's own size, for the catalog
    assert decode_image(data).size == (1800, 1000)


@pytest.mark.parametrize("size", [(1800, 1000), (1003, 1001)])  # drafted, both near square
def test_source_size_of_a_drafted_jpeg_turned_a_quarter_is_upright(size: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", size, RED), "JPEG", exif=exif.tobytes())
    image = decode_image(data, draft_size=224)
    assert max(image.size) < max(size)
    assert image.info["source_size"] == (size[1], size[0])


def test_draft_is_ignored_for_png() -> None:
    data = encode(Image.new("RGB", (900, 500), RED), "PNG")
    assert decode_image(data, draft_size=100).size == (900, 500)


# ---- rejections ----------------------------------------------------------------------


def test_empty_file() -> None:
    assert rejected(b"") == "empty"


@pytest.mark.parametrize("data", [b"hello, world", b'{"json": true}', bytes(range(256))])
def test_not_an_image(data: bytes) -> None:
    assert rejected(data) == "not_an_image"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO", "PPM"])
def test_other_image_formats_are_unsupported(fmt: str) -> None:
    assert rejected(encode(Image.new("RGB", (16, 16), RED), fmt)) == "unsupported_format"


def test_svg_is_unsupported() -> None:
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>'
    assert rejected(svg) == "unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise, "RGB"), fmt)
    assert rejected(data[: len(data) // 2]) == "truncated"
    assert rejected(data[:12]) == "truncated"  # cut inside the header


def test_huge_declared_size_is_a_decompression_bomb() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert rejected(png_header_only(100_000, 100_000)) == "decompression_bomb"
        assert rejected(png_header_only(8_000, 8_000)) == "decompression_bomb"


def test_bomb_check_does_not_rely_on_pillow_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert rejected(png_header_only(100_000, 100_000)) == "decompression_bomb"
    small = ImageLimits(max_pixels=100)
    assert rejected(encode(Image.new("RGB", (20, 20)), "PNG"), limits=small) == (
        "decompression_bomb"
    )


def test_decompression_bomb_webp_is_refused_before_decoding() -> None:
    data = encode(Image.new("RGB", (64, 64), RED), "WEBP")
    assert rejected(data, limits=ImageLimits(max_pixels=1000)) == "decompression_bomb"


def test_long_side_and_byte_limits() -> None:
    data = encode(Image.new("RGB", (300, 2), RED), "PNG")
    assert rejected(data, limits=ImageLimits(max_side=200)) == "too_large"
    assert rejected(data, limits=ImageLimits(max_bytes=10)) == "too_large"


def test_byte_limit_reads_no_more_than_needed_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (64, 64), RED), "PNG") + b"\0" * 5000)
    assert rejected(path, limits=ImageLimits(max_bytes=1000)) == "too_large"


def test_missing_path_is_unreadable(tmp_path: Path) -> None:
    assert rejected(tmp_path / "nope.png") == "unreadable"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_frame_count_bomb(fmt: str) -> None:
    data = animation(fmt, 6)
    assert rejected(data, limits=ImageLimits(max_frames=5)) == "too_many_frames"
    assert decode_image(data, limits=ImageLimits(max_frames=6)).size == (16, 12)


def test_gif_frame_counter_stops_at_the_limit() -> None:
    data = animation("GIF", 6)
    assert count_gif_frames(data, stop_after=100) == 6
    assert count_gif_frames(data, stop_after=3) == 3
    assert count_gif_frames(data[:20], stop_after=100) == 0


def test_mutated_files_only_ever_raise_image_rejected() -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8)
    seeds = [encode(Image.fromarray(pixels, "RGB"), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF")]
    for data in seeds:
        for _ in range(60):
            mutated = bytearray(data)
            for position in rng.integers(0, len(mutated), size=int(rng.integers(1, 8))):
                mutated[int(position)] = int(rng.integers(0, 256))
            with contextlib.suppress(ImageRejected):
                decode_image(bytes(mutated))


def test_sniff_format() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"GIF89a") == "GIF"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_format(b"BM") is None


# ---- embedded metadata ---------------------------------------------------------------

A1111_TEXT = (
    "masterpiece, (red:1.2) orb,\nglowing\n"
    "Negative prompt: blurry, lowres\nwatermark\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 512x512, "
    'Model hash: abc123, Model: dreamshaper_8, Lora hashes: "orb: 1a2b, glow: 3c4d"'
)


def png_with_text(**chunks: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    return encode(Image.new("RGB", (8, 8), RED), "PNG", pnginfo=info)


def test_a1111_parameters_chunk() -> None:
    found = read_embedded_metadata(png_with_text(parameters=A1111_TEXT))
    assert found.source == "a1111"
    assert found.prompt == "masterpiece, (red:1.2) orb,\nglowing"
    assert found.negative_prompt == "blurry, lowres\nwatermark"
    assert found.params["Steps"] == 20
    assert found.params["CFG scale"] == 7.5
    assert found.params["Seed"] == 1234
    assert found.params["Sampler"] == "DPM++ 2M Karras"
    assert found.params["Model"] == "dreamshaper_8"
    assert found.params["Lora hashes"] == "orb: 1a2b, glow: 3c4d"


def test_a1111_text_without_settings_or_negative() -> None:
    found = parse_a1111_parameters("just a prompt, with commas")
    assert found.prompt == "just a prompt, with commas"
    assert found.negative_prompt is None
    assert found.params == {}


COMFY_PROMPT = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 42,
            "steps": 25,
            "cfg": 6.5,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["10", 0],
            "negative": ["5", 0],
            "latent_image": ["9", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
    # The negative encoder has the lower id: only following the links gets this right.
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly, blurry", "clip": ["4", 1]}},
    "10": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["11", 0]}},
    "11": {"class_type": "CLIPTextEncode", "inputs": {"text": ["12", 0], "clip": ["4", 1]}},
    "12": {"class_type": "PrimitiveString", "inputs": {"value": "a teal hexagon, pixel art"}},
}


def test_comfyui_prompt_follows_sampler_links() -> None:
    found = read_embedded_metadata(png_with_text(prompt=json.dumps(COMFY_PROMPT)))
    assert found.source == "comfyui"
    assert found.prompt == "a teal hexagon, pixel art"
    assert found.negative_prompt == "ugly, blurry"
    assert found.params == {
        "Model": "sdxl.safetensors",
        "Seed": 42,
        "Steps": 25,
        "CFG scale": 6.5,
        "Sampler": "euler",
        "Schedule type": "normal",
        "Denoising strength": 1.0,
    }


def test_comfyui_without_sampler_takes_the_first_text() -> None:
    graph = {
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "second"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "first"}},
    }
    found = read_embedded_metadata(png_with_text(prompt=json.dumps(graph)))
    assert found.prompt == "first"
    assert found.negative_prompt is None


def test_comfyui_workflow_graph() -> None:
    workflow = {
        "nodes": [
            {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a pink star"], "inputs": []},
            {"id": 7, "type": "CLIPTextEncode", "widgets_values": ["lowres"], "inputs": []},
            {
                "id": 3,
                "type": "KSampler",
                "widgets_values": [99, "fixed", 30, 7.0, "euler", "karras", 1.0],
                "inputs": [
                    {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                ],
            },
        ],
        "links": [[4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"]],
    }
    found = read_embedded_metadata(png_with_text(workflow=json.dumps(workflow)))
    assert (found.prompt, found.negative_prompt) == ("a pink star", "lowres")
    assert found.params["Seed"] == 99
    assert found.params["Steps"] == 30


@pytest.mark.parametrize(
    "comment",
    [
        b"UNICODE\0" + A1111_TEXT.encode("utf-16-be"),
        b"UNICODE\0" + A1111_TEXT.encode("utf-16-le"),
        b"UNICODE\0" + A1111_TEXT.encode("utf-16"),  # with a BOM
        b"ASCII\0\0\0" + A1111_TEXT.encode("ascii"),
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment(comment: bytes, fmt: str) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    data = encode(Image.new("RGB", (8, 8), RED), fmt, exif=exif.tobytes())
    found = read_embedded_metadata(data)
    assert found.source == "exif"
    assert found.prompt == "masterpiece, (red:1.2) orb,\nglowing"
    assert found.params["Seed"] == 1234


def test_decode_user_comment_edge_cases() -> None:
    assert decode_user_comment(None) is None
    assert decode_user_comment(b"") is None
    assert decode_user_comment(b"UNICODE\0") is None
    assert decode_user_comment(b"\0" * 8 + b"plain") == "plain"
    assert decode_user_comment(b"no header at all") == "no header at all"
    assert decode_user_comment("already text\0") == "already text"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image",
        png_header_only(10, 10)[:20],
        png_with_text(prompt="{not json"),
        png_with_text(prompt="[1, 2, 3]"),
        png_with_text(prompt=json.dumps({"1": {"class_type": "KSampler", "inputs": {}}})),
        png_with_text(prompt=json.dumps({"1": {"inputs": {"positive": ["1", 0]}}})),  # a loop
        png_with_text(workflow=json.dumps({"nodes": [1, {"id": 2}], "links": [None, [1]]})),
        png_with_text(parameters=""),
        encode(Image.new("RGB", (8, 8)), "BMP"),
    ],
)
def test_weird_metadata_never_raises(data: bytes) -> None:
    found = read_embedded_metadata(data)
    assert found.prompt is None
    assert found.source == ""


def test_metadata_from_a_missing_path_is_empty(tmp_path: Path) -> None:
    assert read_embedded_metadata(tmp_path / "missing.png").prompt is None
