"""Fuzzing: the HTTP API against its own OpenAPI document (schemathesis), and the dump readers
and the image decoder (hypothesis).

The default run is bounded and derandomized (the same examples every time, well under a
minute); ``-m slow`` runs the same properties with many more, random examples. Hypothesis'
example database is off, so nothing is written into the repository.
"""

from __future__ import annotations

import json
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from indexer.dump import detect_format, iter_dump
from indexer.errors import ImageRejected
from indexer.images import ImageLimits, decode_image, read_embedded_metadata
from indexer.records import DumpRecord, SkippedEntry
from service.app import create_app
from service.settings import Settings
from tests.hostile_corpus import encode, noise_image, png_chunk

# Small limits keep every fuzzed example cheap; the contract under test does not depend on them.
FUZZ_LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20, max_side=4096, max_frames=64)


def bounded(examples: int, *, randomized: bool = False) -> Callable[[Any], Any]:
    """Hypothesis settings for a bounded, reproducible run (random when ``randomized``)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not randomized,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )


# =========================================================================== HTTP API

# Operations whose OpenAPI entry may lack a status they answer (none at present); an entry
# here is a known gap to fix in its route, not a licence.
UNDOCUMENTED_400: frozenset[str] = frozenset()


def documented_status(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' status-code conformance, less the known gaps above."""
    if response.status_code == 400 and case.operation.label in UNDOCUMENTED_400:
        return None
    result: bool | None = status_code_conformance(ctx, response, case)
    return result


CHECKS = [
    not_a_server_error,
    documented_status,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(pixels_catalog: Path) -> Iterator[Any]:
    settings_ = Settings.model_validate(
        {"catalog": pixels_catalog, "rate_limit_per_s": 0, "max_upload_bytes": 256 * 1024}
    )
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_))
    shutdown_lifespans()  # closes the engine the app opened


def fuzz_api(schema: Any, examples: int, *, randomized: bool) -> tuple[int, list[str]]:
    """Run valid and invalid cases against every operation; (cases run, failure reports)."""
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @bounded(examples, randomized=randomized)
            def run(case: Any) -> None:
                nonlocal ran
                ran += 1
                case.call_and_validate(checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                pass  # no invalid request exists for an operation without inputs
            except (Exception, BaseExceptionGroup) as exc:  # every failing operation is reported
                failures.append(f"{operation.label} ({mode}): {exc}")
    return ran, failures


def test_api_answers_within_its_schema(api_schema: Any) -> None:
    """Valid and invalid requests to every operation: no 5xx, every answer as documented."""
    ran, failures = fuzz_api(api_schema, examples=12, randomized=False)
    assert not failures, "\n\n".join(failures)
    assert ran > 100
    print(f"\nschemathesis: {ran} requests, {len(failures)} failures")  # shown with -s


@pytest.mark.slow
def test_api_answers_within_its_schema_long(api_schema: Any) -> None:
    ran, failures = fuzz_api(api_schema, examples=300, randomized=True)
    assert not failures, "\n\n".join(failures)
    print(f"\nschemathesis: {ran} requests, {len(failures)} failures")  # shown with -s


# =========================================================================== image decoder


def only_rejections(data: bytes) -> None:
    """The decoder's contract: an RGB image within the limits, or ImageRejected; and reading
    embedded metadata never raises."""
    try:
        image = decode_image(data, FUZZ_LIMITS)
    except ImageRejected as exc:
        assert exc.reason in REASONS
    else:
        assert image.mode == "RGB"
        assert image.width * image.height <= FUZZ_LIMITS.max_pixels
    read_embedded_metadata(data)


REASONS = frozenset(
    {
        "empty",
        "not_an_image",
        "unsupported_format",
        "too_large",
        "decompression_bomb",
        "too_many_frames",
        "truncated",
        "corrupt",
    }
)


def _seeds() -> list[bytes]:
    picture = noise_image((24, 20), 5)
    frames = [Image.new("RGB", (6, 5), (i * 60, 10, 200)) for i in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(picture, "JPEG", quality=85),
        encode(picture, "JPEG", quality=85, progressive=True, exif=exif.tobytes()),
        encode(picture, "PNG"),
        encode(picture.convert("P"), "PNG", transparency=0),
        encode(picture, "WEBP", quality=70),
        encode(picture, "WEBP", lossless=True),
        encode(picture.convert("P"), "GIF"),
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    ]


SEEDS = _seeds()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with a few byte-level edits: flips, cuts, inserts, repeated slices."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        edit = draw(st.sampled_from(("set", "cut", "insert", "repeat", "truncate")))
        if edit == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif edit == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 256))] * draw(st.integers(1, 4))
        else:
            del data[at:]
    return bytes(data)


_PNG_KINDS: tuple[bytes, ...] = (b"PLTE", b"tRNS", b"IDAT", b"acTL", b"fcTL", b"fdAT", b"zTXt")
_PNG_KINDS += (b"iTXt", b"tEXt", b"iCCP", b"eXIf", b"gAMA", b"sBIT", b"pHYs", b"IEND")


@st.composite
def png_chunk_soup(draw: st.DrawFn) -> bytes:
    """A PNG signature, an IHDR with any fields, then chunks of any kind and content with valid
    CRCs, so that the parser goes past its checksum checks into the chunk handlers."""
    width, height = draw(st.integers(0, 3000)), draw(st.integers(0, 3000))
    depth, colour = (
        draw(st.sampled_from((1, 2, 4, 8, 16, 3))),
        draw(st.sampled_from((0, 2, 3, 4, 6, 5))),
    )
    fields = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, draw(st.integers(0, 1)))
    chunks = [png_chunk(b"IHDR", fields)]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(_PNG_KINDS))
        if kind in (b"IDAT", b"zTXt", b"iCCP", b"fdAT") and draw(st.booleans()):
            raw = draw(st.binary(max_size=2048))
            body = draw(st.binary(max_size=12)) + zlib.compress(raw)
        else:
            body = draw(st.binary(max_size=64))
        chunks.append(png_chunk(kind, body))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@st.composite
def riff_soup(draw: st.DrawFn) -> bytes:
    """A RIFF/WEBP container holding chunks of the WebP kinds with any content."""
    kinds = (b"VP8 ", b"VP8L", b"VP8X", b"ANIM", b"ANMF", b"ALPH", b"ICCP", b"EXIF", b"XMP ")
    body = b"WEBP"
    for _ in range(draw(st.integers(1, 5))):
        payload = draw(st.binary(max_size=96))
        body += draw(st.sampled_from(kinds)) + struct.pack("<I", len(payload)) + payload
        body += b"\x00" * (len(payload) & 1)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@st.composite
def jpeg_segment_soup(draw: st.DrawFn) -> bytes:
    """SOI, then marker segments (APPn / EXIF, DQT, DHT, SOFn, SOS...) with any content."""
    markers = (0xE0, 0xE1, 0xE2, 0xED, 0xFE, 0xDB, 0xC4, 0xC0, 0xC2, 0xDD, 0xDA)
    out = b"\xff\xd8"
    for _ in range(draw(st.integers(1, 8))):
        marker = draw(st.sampled_from(markers))
        payload = draw(st.binary(max_size=80))
        if marker == 0xE1 and draw(st.booleans()):
            payload = b"Exif\x00\x00" + draw(st.sampled_from((b"II*\x00", b"MM\x00*"))) + payload
        out += bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload
    return out + draw(st.binary(max_size=64)) + draw(st.sampled_from((b"", b"\xff\xd9")))


DECODER_INPUTS = st.one_of(
    st.binary(max_size=2048), mutated_images(), png_chunk_soup(), riff_soup(), jpeg_segment_soup()
)


@given(data=DECODER_INPUTS)
@bounded(400)
def test_decoder_gives_an_image_or_a_rejection(data: bytes) -> None:
    only_rejections(data)


@pytest.mark.slow
@given(data=DECODER_INPUTS)
@bounded(20_000, randomized=True)
def test_decoder_gives_an_image_or_a_rejection_long(data: bytes) -> None:
    only_rejections(data)


# =========================================================================== dump readers

_KEYS: tuple[str, ...] = ("id", "url", "meta", "nsfw", "nsfwLevel", "browsingLevel", "tags")
_KEYS += ("baseModel",)
_KEYS += ("prompt", "image_id", "width", "height", "stats", "createdAt", "username", "items")
_KEYS += ("negativePrompt", "original_level", "model", "created_at", "postId")
_NAMES = ("1", "2", "a", "img", "x y", "ü", "..", ".", "images", "1.png", "2.jpeg", "a.json")
_URLS = (
    "https://image.civitai.com/x/1.png",
    "images/2.jpeg",
    "../outside.png",
    "/etc/passwd",
    "file:///etc/passwd",
    "%2e%2e/%2e%2e/etc/passwd",
    "C:\\windows\\win.ini",
    "images\\..\\..\\x.png",
    "sub/../1.png",
    "",
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(_NAMES + _URLS),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=24,
)
items = st.dictionaries(st.sampled_from(_KEYS), json_values, max_size=8)
documents = st.one_of(
    st.fixed_dictionaries({"items": st.lists(items | json_values, max_size=5)}),
    st.lists(items, max_size=5),
    items,
    json_values,
)


@st.composite
def dumps(draw: st.DrawFn) -> dict[str, bytes]:
    """A small dump: image files, JSON pages / JSONL / sidecars (sometimes not JSON at all)."""
    png = encode(Image.new("RGB", (4, 4), (10, 20, 30)), "PNG")
    files = {"1.png": png, "images/2.jpeg": encode(Image.new("RGB", (4, 4)), "JPEG")}
    files["sub/a.webp"] = encode(Image.new("RGB", (4, 4)), "WEBP")
    for n in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("page.json", "lines.jsonl", "sidecar", "sub/deep.json")))
        if draw(st.integers(0, 9)) == 0:
            content = draw(st.binary(max_size=200))
        elif kind == "lines.jsonl":
            lines = draw(st.lists(documents, max_size=4))
            content = b"\n".join(json.dumps(x).encode() for x in lines)
        else:
            content = json.dumps(draw(documents)).encode()
        name = {"sidecar": "1.json"}.get(kind, kind)
        files[name if n == 0 else f"{n}_{name.replace('/', '_')}"] = content
    return files


def read_whole_dump(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "dump"
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
        entries = list(iter_dump(root))
        detect_format(root)
        records = [e for e in entries if isinstance(e, DumpRecord)]
        assert all(isinstance(e, DumpRecord | SkippedEntry) for e in entries)
        ids = [r.id for r in records]
        assert len(ids) == len(set(ids))
        resolved_root = root.resolve()
        for record in records:
            assert record.image_path.resolve().is_relative_to(resolved_root), record
            assert isinstance(record.id, str) and record.id
            assert all(isinstance(tag, str) for tag in record.tags)
            assert 0 <= record.nsfw_level <= 4


@given(files=dumps())
@bounded(100)
def test_dump_readers_never_raise_and_never_leave_the_root(files: dict[str, bytes]) -> None:
    read_whole_dump(files)


@pytest.mark.slow
@given(files=dumps())
@bounded(2_000, randomized=True)
def test_dump_readers_never_raise_and_never_leave_the_root_long(files: dict[str, bytes]) -> None:
    read_whole_dump(files)


def test_fuzz_seeds_are_valid_images() -> None:
    """The mutations start from files the decoder accepts, so that they reach past the format
    checks into the decoders (all formats, animations, EXIF orientation, palettes)."""
    for data in SEEDS:
        assert decode_image(data, FUZZ_LIMITS).mode == "RGB"
