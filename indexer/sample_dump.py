"""A procedurally drawn, civitai-shaped sample dump with ground truth.

``write_sample_dump`` draws simple scenes (1-3 shapes of one colour, texture and style on
a background), writes them under ``images/`` as JPEG, PNG and WebP, and describes them in
civitai REST API pages (``page_0001.json`` ...) with prompts phrased like real ones. The
same seed gives the same bytes. Noise a real dump has is there on purpose: ``meta: null``,
nested meta, tags as objects or strings, exact duplicates under another id, and broken
files (truncated JPEG, zero bytes, text named ``.png``) whose items stay in the pages.

The ground truth goes to ``truth.jsonl`` (``TRUTH_FILENAME``), one line per id:
``{"id", "shape", "color", "texture", "background", "style", "count", "broken",
"duplicate_of"}``. It is written last, so its presence means the dump is complete, and
``iter_dump`` never reads it (a reserved name there), so the dump reads like one from civitai.

The renderer is public for a later generator: ``ATTRIBUTES``, ``random_attributes``,
``render_image``, ``prompt_for`` and ``attributes_from_terms``. Same colour, shape or
texture gives images that a colour / layout / texture descriptor finds alike.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter

from indexer.dump import GROUND_TRUTH_FILENAME

logger = logging.getLogger(__name__)

Attributes = dict[str, str | int]
"""A scene: shape, color, texture, background, style (str) and count (int)."""

ATTRIBUTES: Final[dict[str, tuple[str, ...]]] = {
    "shape": ("circle", "square", "triangle", "star", "hexagon", "ring", "cross", "heart"),
    "color": (
        "red",
        "orange",
        "yellow",
        "green",
        "teal",
        "blue",
        "purple",
        "pink",
        "brown",
        "gray",
    ),
    "texture": ("plain", "stripes", "dots", "checker", "noise"),
    "background": ("white", "black", "cream", "sky", "sunset", "night"),
    "style": ("flat", "outlined", "soft", "pixelated", "high_contrast"),
    "count": ("1", "2", "3"),
}

TRUTH_FILENAME: Final = GROUND_TRUTH_FILENAME
PAGE_SIZE: Final = 100
SIZES: Final = (192, 224, 256, 288, 320)
BASE_MODELS: Final = ("SD 1.5", "SDXL 1.0", "Pony", "Flux.1 D")
NSFW_LEVELS: Final = ("None", "Soft", "Mature", "X")
_NSFW_WEIGHTS: Final = (0.82, 0.09, 0.06, 0.03)
_BROWSING_LEVEL: Final = {"None": 1, "Soft": 2, "Mature": 4, "X": 8}
_CHECKPOINTS: Final = {
    "SD 1.5": ("dreamshaper_8", "realisticVisionV51"),
    "SDXL 1.0": ("sd_xl_base_1.0", "juggernautXL_v9"),
    "Pony": ("ponyDiffusionV6XL",),
    "Flux.1 D": ("flux1-dev-fp8",),
}
_FORMATS: Final = (("JPEG", ".jpeg"), ("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))
_FORMAT_WEIGHTS: Final = (0.35, 0.15, 0.3, 0.2)
_BROKEN_KINDS: Final = ("truncated_jpeg", "zero_bytes", "text_png")

COLOR_RGB: Final[dict[str, tuple[int, int, int]]] = {
    "red": (215, 30, 40),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "teal": (20, 150, 150),
    "blue": (35, 80, 210),
    "purple": (125, 50, 180),
    "pink": (240, 120, 185),
    "brown": (120, 75, 40),
    "gray": (128, 128, 128),
}
# Backgrounds as (top colour, bottom colour): equal ends are a plain fill.
BACKGROUND_RGB: Final[dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]]] = {
    "white": ((250, 250, 250), (250, 250, 250)),
    "black": ((15, 15, 15), (15, 15, 15)),
    "cream": ((242, 230, 204), (232, 218, 188)),
    "sky": ((110, 170, 235), (225, 240, 255)),
    "sunset": ((250, 160, 60), (115, 45, 125)),
    "night": ((8, 12, 45), (45, 55, 115)),
}

SYNONYMS: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "color": {
        "red": ("red", "crimson", "scarlet", "ruby"),
        "orange": ("orange", "tangerine", "amber"),
        "yellow": ("yellow", "golden", "lemon"),
        "green": ("green", "emerald", "jade"),
        "teal": ("teal", "turquoise", "aqua"),
        "blue": ("blue", "azure", "cobalt", "sapphire"),
        "purple": ("purple", "violet", "amethyst"),
        "pink": ("pink", "rose", "fuchsia"),
        "brown": ("brown", "chocolate", "chestnut"),
        "gray": ("gray", "grey", "silver", "slate"),
    },
    "shape": {
        "circle": ("circle", "orb", "sphere", "disc"),
        "square": ("square", "cube", "block"),
        "triangle": ("triangle", "pyramid", "wedge"),
        "star": ("star", "starburst"),
        "hexagon": ("hexagon", "hex tile", "honeycomb cell"),
        "ring": ("ring", "donut", "hoop", "halo"),
        "cross": ("cross", "plus sign"),
        "heart": ("heart", "love heart"),
    },
    "texture": {
        "plain": ("solid", "plain", "smooth"),
        "stripes": ("striped", "stripy", "banded"),
        "dots": ("polka dot", "dotted", "spotted"),
        "checker": ("checkered", "checkerboard"),
        "noise": ("grainy", "noisy", "speckled"),
    },
    "background": {
        "white": ("white background", "plain white backdrop"),
        "black": ("black background", "dark backdrop"),
        "cream": ("cream background", "beige paper background"),
        "sky": ("blue sky background", "sky gradient"),
        "sunset": ("sunset background", "orange purple gradient"),
        "night": ("night sky background", "midnight backdrop"),
    },
    "style": {
        "flat": ("flat design", "flat colors", "vector art"),
        "outlined": ("bold outline", "line art", "outlined"),
        "soft": ("soft focus", "blurry", "dreamy bokeh"),
        "pixelated": ("pixel art", "8-bit", "pixelated"),
        "high_contrast": ("high contrast", "vivid colors", "saturated"),
    },
    "count": {
        "1": ("a single", "one", "a lone"),
        "2": ("two", "a pair of", "2"),
        "3": ("three", "a trio of", "3"),
    },
}
FILLER: Final = (
    "masterpiece",
    "best quality",
    "8k",
    "highly detailed",
    "ultra detailed",
    "sharp focus",
    "intricate",
    "award winning",
)
# Filler that does not fit what is drawn: real prompts carry such words too.
WRONG_FILLER: Final = ("photorealistic", "portrait", "cinematic lighting", "landscape", "anime")
NEGATIVE_PROMPTS: Final = (
    "worst quality, low quality, jpeg artifacts",
    "blurry, lowres, bad anatomy, watermark",
    "text, signature, watermark, deformed",
)
_SAMPLERS: Final = ("Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM")
_USERNAMES: Final = ("pixelsmith", "orbweaver", "hexhound", "gradientgal", "vectorvik", "noisenik")
_CREATED_BASE: Final = 1_704_067_200  # 2024-01-01T00:00:00Z, so dates do not depend on "now"


@dataclass(frozen=True)
class SampleDumpSummary:
    """What ``write_sample_dump`` wrote. Ids are strings, as ``iter_dump`` yields them."""

    out_dir: Path
    count: int
    pages: tuple[Path, ...]
    images_dir: Path
    truth_path: Path
    broken_ids: tuple[str, ...]
    duplicate_ids: tuple[str, ...]
    meta_null_ids: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"{self.count} images in {len(self.pages)} pages under {self.out_dir} "
            f"({len(self.broken_ids)} broken, {len(self.duplicate_ids)} duplicates, "
            f"{len(self.meta_null_ids)} without meta; truth in {self.truth_path.name})"
        )


@dataclass(frozen=True)
class _Plan:
    """The role of every index: which are broken, duplicates (of what), or have no meta."""

    broken: dict[int, str]
    duplicate_of: dict[int, int]
    meta_null: frozenset[int]
    nested_meta: frozenset[int]


def write_sample_dump(out_dir: Path, count: int, seed: int) -> SampleDumpSummary:
    """Write a sample dump of ``count`` images under ``out_dir`` and return what was written.

    Deterministic: the same ``count`` and ``seed`` give byte-identical files. Existing files
    with the same names are overwritten; nothing else in ``out_dir`` is touched.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(count, np.random.default_rng([seed, 0]))
    ids = _ids(count, np.random.default_rng([seed, 1]))
    items: list[dict[str, Any]] = []
    truth: list[dict[str, Any]] = []
    originals: dict[int, tuple[bytes, str, Attributes]] = {}
    for index in range(count):
        rng = np.random.default_rng([seed, 2, index])
        item, row, payload = _make_item(index, ids, plan, rng, originals)
        (images_dir / payload[0]).write_bytes(payload[1])
        items.append(item)
        truth.append(row)
    pages = _write_pages(out_dir, items)
    truth_path = out_dir / TRUTH_FILENAME  # last: its presence means the dump is complete
    truth_path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in truth))
    logger.info("wrote a sample dump of %d images in %d pages to %s", count, len(pages), out_dir)
    return SampleDumpSummary(
        out_dir=out_dir,
        count=count,
        pages=pages,
        images_dir=images_dir,
        truth_path=truth_path,
        broken_ids=tuple(ids[i] for i in sorted(plan.broken)),
        duplicate_ids=tuple(ids[i] for i in sorted(plan.duplicate_of)),
        meta_null_ids=tuple(ids[i] for i in sorted(plan.meta_null)),
    )


def _plan(count: int, rng: np.random.Generator) -> _Plan:
    """Pick the special indices; index 0 is always a plain original."""
    order = [int(i) for i in rng.permutation(np.arange(1, count))]
    n_broken = min(count // 10, max(3, round(count * 0.02)))
    n_duplicates = min(count // 10, max(2, round(count * 0.02)))
    n_meta_null = min(count // 5, max(1, round(count * 0.05)))
    broken = {i: _BROKEN_KINDS[k % len(_BROKEN_KINDS)] for k, i in enumerate(order[:n_broken])}
    duplicates = order[n_broken : n_broken + n_duplicates]
    special = set(broken) | set(duplicates)
    duplicate_of = {}
    for index in duplicates:
        candidates = [i for i in range(index) if i not in special]
        duplicate_of[index] = int(rng.choice(candidates))
    others = [i for i in range(count) if i not in special]
    picks = [int(i) for i in rng.permutation(others)]
    n_nested = round(len(picks) * 0.1)
    return _Plan(
        broken=broken,
        duplicate_of=duplicate_of,
        meta_null=frozenset(picks[:n_meta_null]),
        nested_meta=frozenset(picks[n_meta_null : n_meta_null + n_nested]),
    )


def _ids(count: int, rng: np.random.Generator) -> list[str]:
    """Increasing civitai-like ids with random gaps."""
    gaps = rng.integers(1, 40, size=count)
    return [str(2_000_000 + int(v)) for v in np.cumsum(gaps)]


def _make_item(
    index: int,
    ids: list[str],
    plan: _Plan,
    rng: np.random.Generator,
    originals: dict[int, tuple[bytes, str, Attributes]],
) -> tuple[dict[str, Any], dict[str, Any], tuple[str, bytes]]:
    """Build one API item, its truth row and (file name, bytes)."""
    ident = ids[index]
    source = plan.duplicate_of.get(index)
    if source is not None:
        data, ext, attrs = originals[source]
    else:
        attrs = random_attributes(rng)
        data, ext = _encoded_image(attrs, rng, plan.broken.get(index))
        originals[index] = (data, ext, attrs)
    uuid = rng.bytes(16).hex()
    by_url = bool(rng.random() < 0.4)
    file_name = f"{uuid}{ext}" if by_url else f"{ident}{ext}"
    width, height = _declared_size(data)
    url = f"https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/{uuid}/width={width}/{uuid}{ext}"
    item = _api_item(ident, url, width, height, attrs, rng, index, plan)
    row = {
        "id": ident,
        **{key: attrs[key] for key in ATTRIBUTES},
        "broken": index in plan.broken,
        "duplicate_of": ids[source] if source is not None else None,
    }
    return item, row, (file_name, data)


def random_attributes(rng: np.random.Generator) -> Attributes:
    """Draw one value per attribute, uniformly; ``count`` is an int."""
    attrs: Attributes = {key: str(rng.choice(values)) for key, values in ATTRIBUTES.items()}
    attrs["count"] = int(attrs["count"])
    return attrs


def _encoded_image(
    attrs: Attributes, rng: np.random.Generator, broken: str | None
) -> tuple[bytes, str]:
    """Render and encode one image; a broken kind gives deliberately bad bytes."""
    size = (int(rng.choice(SIZES)), int(rng.choice(SIZES)))
    image = render_image(attrs, rng, size)
    fmt, ext = _FORMATS[int(rng.choice(len(_FORMATS), p=_FORMAT_WEIGHTS))]
    if broken == "zero_bytes":
        return b"", ext
    if broken == "text_png":
        return b"this is not an image, just text named like one\n", ".png"
    if broken == "truncated_jpeg":
        fmt, ext = "JPEG", ".jpeg"
    buffer = io.BytesIO()
    options: dict[str, Any] = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"quality": 85}}[fmt]
    image.save(buffer, fmt, **options)
    data = buffer.getvalue()
    return (data[: len(data) * 2 // 5], ext) if broken == "truncated_jpeg" else (data, ext)


def _declared_size(data: bytes) -> tuple[int, int]:
    """The size the item claims; broken files claim a plausible one."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, SyntaxError):
        return 256, 256


def _api_item(
    ident: str,
    url: str,
    width: int,
    height: int,
    attrs: Attributes,
    rng: np.random.Generator,
    index: int,
    plan: _Plan,
) -> dict[str, Any]:
    """One item shaped like civitai's ``GET /api/v1/images`` answer."""
    level = str(rng.choice(NSFW_LEVELS, p=_NSFW_WEIGHTS))
    base_model = str(rng.choice(BASE_MODELS))
    prompt, tags = prompt_for(attrs, rng)
    meta: dict[str, Any] | None = {
        "prompt": prompt,
        "negativePrompt": str(rng.choice(NEGATIVE_PROMPTS)),
        "seed": int(rng.integers(0, 2**32)),
        "steps": int(rng.choice((20, 25, 30, 40))),
        "sampler": str(rng.choice(_SAMPLERS)),
        "cfgScale": float(rng.choice((5.0, 6.5, 7.0, 7.5))),
        "Model": str(rng.choice(_CHECKPOINTS[base_model])),
        "Size": f"{width}x{height}",
    }
    if index in plan.meta_null:
        meta = None
    elif index in plan.nested_meta:
        meta = {"id": int(ident) * 3, "meta": meta}
    tag_objects = bool(rng.random() < 0.5)
    return {
        "id": int(ident),
        "url": url,
        "hash": rng.bytes(10).hex(),
        "width": width,
        "height": height,
        "nsfwLevel": level,
        "nsfw": level in ("Mature", "X"),
        "browsingLevel": _BROWSING_LEVEL[level],
        "createdAt": _iso_time(_CREATED_BASE + index * 600 + int(rng.integers(0, 600))),
        "postId": 500_000 + index // 3,
        "username": str(rng.choice(_USERNAMES)),
        "baseModel": base_model,
        "stats": {
            "cryCount": int(rng.integers(0, 5)),
            "laughCount": int(rng.integers(0, 10)),
            "likeCount": int(rng.integers(0, 300)),
            "heartCount": int(rng.integers(0, 100)),
            "commentCount": int(rng.integers(0, 20)),
        },
        "meta": meta,
        "tags": [{"id": _tag_id(t), "name": t} for t in tags] if tag_objects else tags,
    }


def _tag_id(name: str) -> int:
    return 1000 + sum((i + 1) * ord(c) for i, c in enumerate(name)) % 90_000


def _iso_time(seconds: int) -> str:
    moment = dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _write_pages(out_dir: Path, items: list[dict[str, Any]]) -> tuple[Path, ...]:
    """Write ``page_0001.json`` ... with ``PAGE_SIZE`` items each; return their paths."""
    total_pages = max(1, math.ceil(len(items) / PAGE_SIZE))
    pages = []
    for number in range(1, total_pages + 1):
        chunk = items[(number - 1) * PAGE_SIZE : number * PAGE_SIZE]
        next_page = (
            f"https://civitai.com/api/v1/images?limit={PAGE_SIZE}&page={number + 1}"
            if number < total_pages
            else None
        )
        document = {
            "items": chunk,
            "metadata": {
                "totalItems": len(items),
                "currentPage": number,
                "pageSize": PAGE_SIZE,
                "totalPages": total_pages,
                "nextPage": next_page,
            },
        }
        path = out_dir / f"page_{number:04d}.json"
        path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
        pages.append(path)
    return tuple(pages)


# ---- rendering -----------------------------------------------------------------------


def render_image(
    attrs: Attributes, rng: np.random.Generator, size: tuple[int, int] = (256, 256)
) -> Image.Image:
    """Draw the scene ``attrs`` describes and return an RGB image of ``size`` (width, height).

    Objects are large (a single one spans about 60% of the short side) so that colour and
    layout dominate; ``rng`` jitters positions, rotation and shade slightly.
    """
    width, height = size
    colour = _jitter(COLOR_RGB[str(attrs["color"])], rng)
    canvas = _background(str(attrs["background"]), size)
    mask = _objects_mask(str(attrs["shape"]), int(attrs["count"]), size, rng)
    fill = _texture(str(attrs["texture"]), colour, size, rng)
    canvas.paste(fill, mask=mask)
    return _stylise(canvas, mask, str(attrs["style"]), colour, min(width, height))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shifted = np.clip(np.array(rgb) + rng.integers(-10, 11, size=3), 0, 255)
    return (int(shifted[0]), int(shifted[1]), int(shifted[2]))


def _background(name: str, size: tuple[int, int]) -> Image.Image:
    top, bottom = BACKGROUND_RGB[name]
    width, height = size
    ramp = np.linspace(0.0, 1.0, height)[:, None]
    rows = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp).round().astype(np.uint8)
    pixels = np.broadcast_to(rows[:, None, :], (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


# Centres (fractions of width, height) and radius (fraction of the short side) per count.
_LAYOUTS: Final = {
    1: (((0.5, 0.5),), 0.30),
    2: (((0.28, 0.5), (0.72, 0.5)), 0.2),
    3: (((0.25, 0.33), (0.75, 0.33), (0.5, 0.72)), 0.17),
}


def _objects_mask(
    shape: str, count: int, size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    width, height = size
    centres, radius_share = _LAYOUTS[count]
    mask = Image.new("L", size, 0)
    for cx, cy in centres:
        one = Image.new("L", size, 0)
        centre = (
            (cx + rng.uniform(-0.04, 0.04)) * width,
            (cy + rng.uniform(-0.04, 0.04)) * height,
        )
        radius = radius_share * min(width, height) * rng.uniform(0.9, 1.1)
        _draw_shape(ImageDraw.Draw(one), shape, centre, radius, rng.uniform(-20, 20))
        mask = ImageChops.lighter(mask, one)
    return mask


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    radius: float,
    rotation: float,
) -> None:
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        inner = radius * 0.55
        draw.ellipse(box, fill=255)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape in ("square", "triangle", "hexagon"):
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        draw.regular_polygon((cx, cy, radius), sides, rotation=rotation, fill=255)
    else:
        draw.polygon(_outline_points(shape, centre, radius, rotation), fill=255)


def _outline_points(
    shape: str, centre: tuple[float, float], radius: float, rotation: float
) -> list[tuple[float, float]]:
    """Polygon corners of a star, cross or heart around ``centre``."""
    if shape == "star":
        angles = np.linspace(0, 2 * np.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([np.sin(angles) * radii, -np.cos(angles) * radii], axis=1)
    elif shape == "cross":
        a, b = 1.0, 0.34
        corners = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b)]
        corners += [(b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
        points = np.array(corners)
    else:  # heart: the classic parametric curve, scaled to about unit radius
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        points = np.stack([x, -y - 2.5], axis=1) / 16.5
    theta = np.deg2rad(rotation)
    turn = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    placed = points @ turn.T * radius + np.array(centre)
    return [(float(x), float(y)) for x, y in placed]


def _texture(
    name: str, colour: tuple[int, int, int], size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """An RGB fill of ``size``: the colour plus a pattern in a darker or lighter shade."""
    width, height = size
    base = np.array(colour, dtype=np.float32)
    if name == "noise":
        ramp = np.linspace(1.0, 0.55, height, dtype=np.float32)[:, None, None]
        grain = rng.standard_normal((height, width, 3), dtype=np.float32) * 28
        return _rgb(base * ramp + grain)
    if name == "plain":
        return Image.new("RGB", size, colour)
    xs = np.arange(width)[None, :]
    ys = np.arange(height)[:, None]
    period = max(6, min(width, height) // 14)
    if name == "dots":
        offset = (xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2
        pattern = offset >= (period / 3.2) ** 2
        other = base + (255 - base) * 0.55  # light dots on the colour
    else:
        cells = (xs + ys) // period if name == "stripes" else xs // period + ys // period
        pattern = cells % 2 == 0
        other = base * 0.55  # dark bands / squares
    return _rgb(np.where(pattern[..., None], base, other))


def _rgb(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _stylise(
    image: Image.Image, mask: Image.Image, style: str, colour: tuple[int, int, int], side: int
) -> Image.Image:
    if style == "outlined":
        # A band on both sides of the mask's edge (where a box blur is neither 0 nor 255).
        blurred = mask.filter(ImageFilter.BoxBlur(max(2, side // 80)))
        edge = blurred.point([0] * 16 + [255] * 224 + [0] * 16)
        dark = tuple(int(c * 0.25) for c in colour)
        image.paste(Image.new("RGB", image.size, dark), mask=edge)
        return image
    if style == "soft":
        return image.filter(ImageFilter.GaussianBlur(radius=side / 60))
    if style == "pixelated":
        cells = (max(1, image.width // 12), max(1, image.height // 12))
        small = image.resize(cells, Image.Resampling.BOX)
        return small.resize(image.size, Image.Resampling.NEAREST)
    if style == "high_contrast":
        # Contrast and saturation up, hue kept: per-channel autocontrast would shift colours.
        return ImageEnhance.Color(ImageEnhance.Contrast(image).enhance(1.5)).enhance(1.5)
    return image


# ---- prompts -------------------------------------------------------------------------


def prompt_for(attrs: Attributes, rng: np.random.Generator) -> tuple[str, list[str]]:
    """Phrase a prompt for ``attrs`` like people do, and the tags a tagger would give.

    Synonyms vary (``crimson`` for red, ``orb`` for circle), some words get weights such as
    ``(crimson:1.2)``, quality filler frames the subject, and now and then an attribute is
    left out or a filler word does not fit. Tags are canonical attribute names, a few dropped.
    """
    words = {key: _synonym(key, str(attrs[key]), rng) for key in SYNONYMS if key != "count"}
    count = int(attrs["count"])
    for key in ("texture", "background", "style"):
        if rng.random() < 0.12:
            words[key] = ""
    for key in ("color", "shape"):
        if rng.random() < 0.3:
            words[key] = f"({words[key]}:{rng.choice((1.1, 1.2, 1.3, 1.4))})"
    noun = words["shape"] if count == 1 else _plural(words["shape"])
    number = "" if count == 1 and rng.random() < 0.4 else _synonym("count", str(count), rng)
    subject = " ".join(w for w in (number, words["texture"], words["color"], noun) if w)
    parts = list(rng.choice(FILLER, size=int(rng.integers(1, 3)), replace=False))
    parts += [subject, words["background"], words["style"]]
    parts += list(rng.choice(FILLER, size=int(rng.integers(1, 3)), replace=False))
    if rng.random() < 0.1:
        parts.append(str(rng.choice(WRONG_FILLER)))
    prompt = ", ".join(str(p) for p in parts if p)
    return prompt, _tags_for(attrs, rng)


def _synonym(key: str, value: str, rng: np.random.Generator) -> str:
    return str(rng.choice(SYNONYMS[key][value]))


def _plural(noun: str) -> str:
    """English plural of a (possibly weighted) noun: ``orb`` -> ``orbs``, ``(box:1.2)``."""
    if noun.startswith("("):
        word, _, weight = noun[1:].partition(":")
        return f"({_plural(word)}:{weight}"
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _tags_for(attrs: Attributes, rng: np.random.Generator) -> list[str]:
    tags = [
        str(attrs["color"]),
        str(attrs["shape"]),
        f"{attrs['texture']} pattern",
        f"{attrs['background']} background",
        str(attrs["style"]).replace("_", " "),
        "geometric",
        "abstract",
    ]
    return [tag for tag in tags if rng.random() >= 0.1]


def _term_lookup() -> dict[str, tuple[str, str]]:
    """Every phrase that names an attribute value: synonyms, plurals, tag forms."""
    lookup: dict[str, tuple[str, str]] = {}
    for key, values in SYNONYMS.items():
        for value, phrases in values.items():
            forms = {value, value.replace("_", " "), *phrases}
            if key == "shape":
                forms |= {_plural(p) for p in phrases}
            if key == "texture":
                forms.add(f"{value} pattern")
            if key == "background":
                forms.add(f"{value} background")
            for form in forms:
                lookup.setdefault(form, (key, value))
    return lookup


_TERMS: Final = _term_lookup()
_LONGEST_TERM: Final = max(len(term.split()) for term in _TERMS)
_WEIGHT: Final = re.compile(r":\s*[\d.]+\s*\)")
_TOKEN: Final = re.compile(r"[a-z0-9_\-]+")


def attributes_from_terms(terms: Iterable[str], rng: np.random.Generator) -> Attributes:
    """Map words and phrases (synonyms, plurals, tags, weighted ``(red:1.2)``) to attributes.

    The first term naming an attribute wins; attributes no term names are drawn at random
    from ``ATTRIBUTES``. ``count`` comes back as an int.
    """
    found: dict[str, str] = {}
    for term in terms:
        tokens = _TOKEN.findall(_WEIGHT.sub(")", term.lower()))
        start = 0
        while start < len(tokens):
            for length in range(min(_LONGEST_TERM, len(tokens) - start), 0, -1):
                match = _TERMS.get(" ".join(tokens[start : start + length]))
                if match is not None:
                    found.setdefault(*match)
                    start += length
                    break
            else:
                start += 1
    attrs: Attributes = {}
    for key, values in ATTRIBUTES.items():
        attrs[key] = found[key] if key in found else str(rng.choice(values))
    attrs["count"] = int(attrs["count"])
    return attrs
