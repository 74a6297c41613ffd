"""A deterministic corpus of hostile image files, built in memory (nothing is committed).

Each ``Hostile`` carries the file name it is dumped under (its extension may lie), its bytes
and the reason ``decode_image`` must give with the default limits. The files cover the
families of ARCHITECTURE §3's threat list: decompression bombs (pixels, zlib text / ICC
chunks), frame bombs, truncated and corrupt JPEG / PNG / WebP / GIF, zero bytes, polyglots,
SVG (with entity expansion and external references), huge or empty declared dimensions, and
other formats behind image extensions. Files with an extension the dump reader refuses outright
(``.svg``, ``.bmp`` ...) have ``decode_reason`` set to the reason the reader's skip gives.

The PNG / GIF builders are shared with tests/test_images.py.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cache

from PIL import Image

# Extensions the dump reader skips by name without decoding (see indexer/dump.py).
READER_REFUSED_EXTENSIONS = frozenset({".svg", ".bmp", ".tif", ".tiff", ".avif", ".heic"})


@dataclass(frozen=True)
class Hostile:
    """One hostile file: where it goes in a dump, its bytes, and what the decoder must say."""

    name: str
    extension: str  # it may lie about the content
    data: bytes
    decode_reason: str
    family: str

    @property
    def filename(self) -> str:
        return self.name + self.extension

    @property
    def refused_by_name(self) -> bool:
        """The dump reader skips this file by its extension without decoding it."""
        return self.extension in READER_REFUSED_EXTENSIONS


# ---------------------------------------------------------------------------- builders


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_ihdr(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` and holds no pixel data at all."""
    return PNG_SIGNATURE + png_ihdr(width, height) + png_chunk(b"IEND", b"")


def png_with_chunks(width: int, height: int, *chunks: bytes, colour: int = 0) -> bytes:
    """A complete, valid ``width`` x ``height`` PNG (grey or RGB zeros) with extra chunks
    before its pixel data."""
    channels = {0: 1, 2: 3}[colour]
    raw = (b"\x00" + b"\x00" * (width * channels)) * height
    return (
        PNG_SIGNATURE
        + png_ihdr(width, height, colour=colour)
        + b"".join(chunks)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def gif_with_frames(frames: int, width: int = 1, height: int = 1) -> bytes:
    """A GIF of ``frames`` 1x1 frames on a ``width`` x ``height`` screen."""
    frame = b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00"
    screen = struct.pack("<HH", width, height) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    return b"GIF89a" + screen + frame * frames + b"\x3b"


def gif_frame_larger_than_screen(width: int, height: int) -> bytes:
    """A 1x1-screen GIF whose one frame declares ``width`` x ``height`` (Pillow grows the
    canvas to fit it) with almost no pixel data."""
    screen = struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, width, height) + b"\x00"
    return b"GIF89a" + screen + descriptor + b"\x02\x02\x44\x01\x00\x3b"


def apng_claiming_frames(frames: int) -> bytes:
    """A 2-frame APNG whose acTL chunk claims ``frames`` frames."""
    first, second = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    data = encode(first, "PNG", save_all=True, append_images=[second])
    at = data.index(b"acTL") - 4
    patched = png_chunk(b"acTL", struct.pack(">II", frames, 0))
    return data[:at] + patched + data[at + len(patched) :]


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to declare ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (90, 30, 200)), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def webp_vp8x_declaring(width: int, height: int) -> bytes:
    """A WebP extended header (VP8X) declaring a ``width`` x ``height`` canvas, and nothing."""
    flags = b"\x00\x00\x00\x00"
    size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", 10) + flags + size
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8l_declaring(width: int, height: int) -> bytes:
    """A lossless WebP header (VP8L) declaring ``width`` x ``height``, with junk after it."""
    bits = (width - 1) | ((height - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 32
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Deterministic noise (compresses badly, so a cut lands inside the pixel data)."""
    width, height = size
    data = bytes((i * 2654435761 + seed) >> 11 & 0xFF for i in range(width * height * 3))
    return Image.frombytes("RGB", size, data)


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def animated_webp(frames: int) -> bytes:
    images = [Image.new("RGB", (2, 2), (i % 256, 0, 0)) for i in range(frames)]
    return encode(images[0], "WEBP", save_all=True, append_images=images[1:], lossless=True)


SVG_BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<svg xmlns="http://www.w3.org/2000/svg"><text>&lol3;</text></svg>"""
SVG_EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE svg [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">
<image xlink:href="http://169.254.169.254/latest/meta-data/"/><text>&xxe;</text></svg>"""


# ---------------------------------------------------------------------------- the corpus


@cache
def hostile_corpus() -> tuple[Hostile, ...]:
    """Every hostile file, in a fixed order (same bytes on every call and machine)."""
    jpeg = encode(noise_image((96, 64)), "JPEG", quality=90)
    progressive = encode(noise_image((96, 64), 1), "JPEG", quality=90, progressive=True)
    png = encode(noise_image((64, 48)), "PNG")
    webp = encode(noise_image((64, 48)), "WEBP", quality=80)
    gif = encode(noise_image((40, 30)).convert("P"), "GIF")
    bad_crc = bytearray(png_header_only(8, 8))
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    huge_text = zlib.compress(b"\x00" * (64 * 1024 * 1024), 9)  # 64 MiB of text in ~64 kB
    ztxt = png_chunk(b"zTXt", b"parameters\x00\x00" + huge_text)
    iccp = png_chunk(b"iCCP", b"icc\x00\x00" + huge_text)
    zeros_8k = png_with_chunks(8000, 8000)  # a real zlib bomb: 64 Mpx of zeros in ~60 kB
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    bmp = encode(Image.new("RGB", (8, 8)), "BMP")
    ico = encode(Image.new("RGB", (16, 16)), "ICO")
    psd_head = b"8BPS\x00\x01" + b"\x00" * 20

    entries: list[tuple[str, str, bytes, str, str]] = [
        # (name, extension, bytes, decode reason, family); the file is <name><extension>
        ("zero_bytes_jpg", ".jpg", b"", "empty", "zero bytes"),
        ("zero_bytes_png", ".png", b"", "empty", "zero bytes"),
        ("one_byte", ".webp", b"\xff", "not_an_image", "zero bytes"),
        ("jpeg_soi_only", ".jpg", b"\xff\xd8\xff", "truncated", "truncated"),
        ("jpeg_half", ".jpg", cut(jpeg, 0.5), "truncated", "truncated"),
        ("jpeg_header_only", ".jpg", jpeg[:200], "truncated", "truncated"),
        ("jpeg_progressive_cut", ".jpg", cut(progressive, 0.6), "truncated", "truncated"),
        ("png_half", ".png", cut(png, 0.5), "truncated", "truncated"),
        ("png_cut_in_ihdr", ".png", png[:20], "truncated", "truncated"),
        ("png_no_idat", ".png", png_header_only(16, 16), "corrupt", "truncated"),
        ("webp_half", ".webp", cut(webp, 0.5), "truncated", "truncated"),
        ("webp_riff_only", ".webp", webp[:12], "truncated", "truncated"),
        ("gif_half", ".gif", cut(gif, 0.5), "truncated", "truncated"),
        ("png_bad_crc", ".png", bytes(bad_crc), "corrupt", "corrupt"),
        ("png_bad_depth", ".png", png_with_bad_depth(depth=3), "corrupt", "corrupt"),
        ("png_zero_size", ".png", png_header_only(0, 0), "corrupt", "huge dimensions"),
        (
            "png_100k_square",
            ".png",
            png_header_only(100_000, 100_000),
            "decompression_bomb",
            "decompression bomb",
        ),
        ("png_zlib_bomb_8k", ".png", zeros_8k, "decompression_bomb", "decompression bomb"),
        ("png_ztxt_bomb", ".png", png_with_chunks(8, 8, ztxt), "corrupt", "decompression bomb"),
        ("png_iccp_bomb", ".png", png_with_chunks(8, 8, iccp), "corrupt", "decompression bomb"),
        ("png_side_30k", ".png", png_header_only(30_000, 10), "too_large", "huge dimensions"),
        (
            "jpeg_65k_square",
            ".jpg",
            jpeg_declaring(65_000, 65_000),
            "decompression_bomb",
            "decompression bomb",
        ),
        ("jpeg_zero_height", ".jpg", jpeg_declaring(16, 0), "corrupt", "huge dimensions"),
        (
            "webp_vp8x_16k",
            ".webp",
            webp_vp8x_declaring(16_384, 16_384),
            "decompression_bomb",
            "decompression bomb",
        ),
        (
            "webp_vp8l_16k",
            ".webp",
            webp_vp8l_declaring(16_384, 16_384),
            "decompression_bomb",
            "decompression bomb",
        ),
        (
            "gif_screen_65k",
            ".gif",
            gif_with_frames(1, 65_535, 65_535),
            "decompression_bomb",
            "decompression bomb",
        ),
        (
            "gif_frame_grows_canvas",
            ".gif",
            gif_frame_larger_than_screen(12_000, 12_000),
            "decompression_bomb",
            "decompression bomb",
        ),
        ("gif_1500_frames", ".gif", gif_with_frames(1500), "too_many_frames", "frame bomb"),
        (
            "apng_claims_1m_frames",
            ".png",
            apng_claiming_frames(1_000_000),
            "too_many_frames",
            "frame bomb",
        ),
        ("webp_1001_frames", ".webp", animated_webp(1001), "too_many_frames", "frame bomb"),
        (
            "polyglot_html_in_jpeg",
            ".jpg",
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"<html><script>alert(1)</script></html>",
            "truncated",
            "polyglot",
        ),
        (
            "polyglot_pdf_in_png",
            ".png",
            PNG_SIGNATURE + b"%PDF-1.4\n1 0 obj<<>>endobj\n",
            "corrupt",
            "polyglot",
        ),
        (
            "polyglot_gif_js",
            ".gif",
            b"GIF89a=1;alert(document.cookie)//" + b"\x00" * 16,
            "truncated",
            "polyglot",
        ),
        (
            "polyglot_zip_then_png",
            ".png",
            b"PK\x03\x04" + b"\x00" * 26 + png,
            "not_an_image",
            "polyglot",
        ),
        (
            "riff_wave_as_webp",
            ".webp",
            b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 24,
            "not_an_image",
            "wrong extension",
        ),
        ("svg_file", ".svg", SVG_BILLION_LAUGHS, "unsupported_format", "svg"),
        ("svg_laughs_as_png", ".png", SVG_BILLION_LAUGHS, "unsupported_format", "svg"),
        ("svg_xxe_as_jpg", ".jpg", SVG_EXTERNAL, "unsupported_format", "svg"),
        ("bmp_as_jpg", ".jpg", bmp, "unsupported_format", "wrong extension"),
        ("bmp_file", ".bmp", bmp, "unsupported_format", "wrong extension"),
        ("tiff_as_png", ".png", tiff, "unsupported_format", "wrong extension"),
        ("ico_as_gif", ".gif", ico, "unsupported_format", "wrong extension"),
        ("psd_as_png", ".png", psd_head, "unsupported_format", "wrong extension"),
        (
            "avif_as_webp",
            ".webp",
            b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40,
            "unsupported_format",
            "wrong extension",
        ),
        (
            "html_as_png",
            ".png",
            b"<!doctype html><html><body>hi</body></html>",
            "not_an_image",
            "wrong extension",
        ),
        ("json_as_jpg", ".jpg", b'{"id": 1, "prompt": "a cat"}', "not_an_image", "wrong extension"),
        (
            "elf_as_png",
            ".png",
            b"\x7fELF\x02\x01\x01" + b"\x00" * 57,
            "not_an_image",
            "wrong extension",
        ),
    ]
    return tuple(Hostile(*entry) for entry in entries)


def png_with_bad_depth(depth: int) -> bytes:
    """An 8x8 PNG with an invalid IHDR bit depth, and real pixel data after it."""
    return (
        PNG_SIGNATURE
        + png_ihdr(8, 8, depth=depth)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + png_chunk(b"IEND", b"")
    )


def control_images() -> dict[str, bytes]:
    """A few good files that must still be indexed beside the hostile ones."""
    return {
        "good_jpeg.jpg": encode(noise_image((48, 40), 3), "JPEG", quality=90),
        "good_png.png": encode(Image.new("RGB", (40, 48), (20, 180, 90)), "PNG"),
        "good_webp.webp": encode(Image.new("RGB", (32, 32), (200, 40, 40)), "WEBP"),
    }
