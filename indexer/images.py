"""Safe image decoding and the generation metadata embedded in image files.

``decode_image`` turns untrusted bytes into an RGB ``PIL.Image.Image`` or raises
``ImageRejected`` with a stable reason code; no other exception escapes for bad bytes.
It never touches Pillow's global state (``MAX_IMAGE_PIXELS`` and friends): the format is
sniffed here, the format's plugin class is called directly, and the limits travel in an
``ImageLimits`` value, so concurrent calls with different limits are safe.

``read_embedded_metadata`` reads the prompt that AUTOMATIC1111, ComfyUI and EXIF-writing
tools leave in the file; it never raises.
"""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
from PIL import (
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

from indexer.errors import ImageRejected

logger = logging.getLogger(__name__)

ALLOWED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF")
IMAGE_EXTENSIONS: Final = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif"})
"""File name extensions (lower case) of the allowed formats; what the dump readers look for."""

# Everything Pillow raises for bad bytes. DecompressionBombError is handled before these.
_DECODE_ERRORS: Final = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    zlib.error,
)

_PLUGINS: Final[dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,  # not jpeg_factory: MPO extras are ignored anyway
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
}

# Signatures of image formats we recognise but refuse ("unsupported_format", not "not_an_image").
_OTHER_SIGNATURES: Final = (
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"icns", "ICNS"),
    (b"%!PS", "EPS"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
_FTYP_IMAGE_BRANDS: Final = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1", b"hevc")
_PNM_SIGNATURE: Final = re.compile(rb"P[1-7]\s")
_SNIFF_BYTES: Final = 512  # enough for every signature and an SVG's XML prologue

_WHITE: Final = (255, 255, 255)
_ORIENTATION_TAG: Final = 0x0112
_QUARTER_TURNS: Final = frozenset({5, 6, 7, 8})  # orientations that swap width and height
_EXIF_IFD: Final = 0x8769
_USER_COMMENT_TAG: Final = 0x9286


@dataclass(frozen=True)
class ImageLimits:
    """What ``decode_image`` accepts. Sizes are checked from the header, before any pixel."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_side: int = 20_000
    max_frames: int = 1000


DEFAULT_LIMITS: Final = ImageLimits()


def decode_image(
    source: bytes | Path,
    limits: ImageLimits = DEFAULT_LIMITS,
    *,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode an image file safely and return it as an RGB ``PIL.Image.Image``.

    Only JPEG, PNG, WebP and GIF are accepted; of an animation (GIF, animated WebP, APNG)
    the first frame comes back. EXIF orientation is applied, alpha is composited on white,
    palette / grey / CMYK / 16-bit images are converted to 8-bit RGB.

    ``draft_size``: for JPEG only, decode at a reduced scale (1/2, 1/4, 1/8) whose short
    side is still at least ``draft_size`` pixels; much faster when the caller resizes anyway.
    ``image.info["source_size"]`` is the file's own (width, height), upright, either way.

    Raises ``ImageRejected`` with ``reason`` one of ``empty``, ``not_an_image``,
    ``unsupported_format``, ``too_large``, ``decompression_bomb``, ``too_many_frames``,
    ``truncated``, ``corrupt``, ``unreadable`` (a path that cannot be read).
    """
    data = _read_limited(source, limits.max_bytes)
    stream = io.BytesIO(data)
    image = _open_checked(stream, limits)
    drafted = draft_size is not None and image.format == "JPEG"
    header_size = image.size
    try:
        _check_frames(image, data, limits.max_frames)
        if drafted and draft_size is not None:
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", f"refused: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise _rejection_for(exc, ran_out=False) from exc
    _check_dimensions(image.size, limits)  # a GIF frame may grow the canvas while loading
    width, height = header_size if drafted else image.size
    upright, turned = _apply_orientation(image)
    if turned:  # (not upright.size != image.size: a drafted 1003x1001 is square)
        width, height = height, width
    rgb = _to_rgb(upright)
    rgb.info["source_size"] = (width, height)
    return rgb


def sniff_format(head: bytes) -> str | None:
    """Return the allowed format ("JPEG", "PNG", "WEBP", "GIF") that ``head`` starts, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _read_limited(source: bytes | Path, max_bytes: int) -> bytes:
    """Return the bytes of ``source``, reading at most ``max_bytes`` + 1 from a path."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as handle:
                data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise ImageRejected("unreadable", f"cannot read {source}: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageRejected("too_large", f"the file is larger than {max_bytes} bytes")
    return data


def _open_checked(stream: IO[bytes], limits: ImageLimits) -> ImageFile.ImageFile:
    """Parse the header of an allowed format and check its dimensions; no pixel is decoded."""
    head = stream.read(_SNIFF_BYTES)
    stream.seek(0)
    if not head:
        raise ImageRejected("empty", "the file is empty (0 bytes)")
    fmt = sniff_format(head)
    if fmt is None:
        other = _other_image_format(head)
        if other is not None:
            raise ImageRejected(
                "unsupported_format", f"{other} images are not accepted (JPEG, PNG, WebP, GIF)"
            )
        raise ImageRejected("not_an_image", "the file is not an image")
    if fmt == "WEBP":
        # WebP's decoder allocates the canvas while opening, so check the size first.
        size = _webp_canvas_size(head)
        if size is not None:
            _check_dimensions(size, limits)
    try:
        image = _PLUGINS[fmt](stream)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", f"refused: {exc}") from exc
    except _DECODE_ERRORS as exc:
        # Header parsers read in small steps: hitting the end here means the file is cut.
        raise _rejection_for(exc, ran_out=stream.read(1) == b"") from exc
    _check_dimensions(image.size, limits)
    return image


def _other_image_format(head: bytes) -> str | None:
    """Name the refused image format that ``head`` starts, or None if it is no image we know."""
    for signature, name in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _FTYP_IMAGE_BRANDS:
        return "HEIF/AVIF"
    if _PNM_SIGNATURE.match(head):
        return "PNM"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"<") and b"<svg" in text.lower():
        return "SVG"
    return None


def _webp_canvas_size(head: bytes) -> tuple[int, int] | None:
    """Read a WebP canvas size from its first 30 bytes (VP8, VP8L or VP8X), or None."""
    if len(head) < 30:
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", head, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = struct.unpack_from("<I", head, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    return None


def _check_dimensions(size: tuple[int, int], limits: ImageLimits) -> None:
    """Raise ``ImageRejected`` when a declared size exceeds the limits."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"the header declares an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"{width}x{height} is more than {limits.max_pixels} pixels",
        )
    if max(width, height) > limits.max_side:
        raise ImageRejected(
            "too_large", f"{width}x{height} has a side longer than {limits.max_side} pixels"
        )


def _check_frames(image: ImageFile.ImageFile, data: bytes, max_frames: int) -> None:
    """Raise ``too_many_frames`` for animations longer than ``max_frames``."""
    if image.format == "GIF":
        # Pillow's n_frames walks every frame in Python; this scan stops at the limit.
        frames = count_gif_frames(data, stop_after=max_frames + 1)
    else:
        frames = int(getattr(image, "n_frames", 1))  # APNG acTL / WebP header: cheap
    if frames > max_frames:
        raise ImageRejected("too_many_frames", f"the animation has more than {max_frames} frames")


def count_gif_frames(data: bytes, stop_after: int) -> int:
    """Count the image descriptors of a GIF, stopping at ``stop_after``; tolerant of junk."""
    if len(data) < 13:
        return 0
    pos = 13 + _colour_table_size(data[10])
    frames = 0
    while pos < len(data) and frames < stop_after:
        block = data[pos]
        if block == 0x2C:  # image descriptor: 10 bytes, local table, LZW size, data
            frames += 1
            if pos + 10 > len(data):
                break
            pos += 10 + _colour_table_size(data[pos + 9]) + 1
            pos = _skip_sub_blocks(data, pos)
        elif block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        else:  # trailer (0x3B) or garbage
            break
    return frames


def _colour_table_size(flags: int) -> int:
    return 3 * (2 << (flags & 7)) if flags & 0x80 else 0


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data):
        size = data[pos]
        pos += 1 + size
        if size == 0:
            break
    return pos


def _rejection_for(exc: Exception, *, ran_out: bool) -> ImageRejected:
    """Map a Pillow failure to ``truncated`` (the data ran out) or ``corrupt``."""
    message = str(exc) or type(exc).__name__
    if ran_out or isinstance(exc, EOFError) or "truncated" in message.lower():
        return ImageRejected("truncated", f"the file ends early: {message}")
    return ImageRejected("corrupt", f"the image data is corrupt: {message}")


def _apply_orientation(image: Image.Image) -> tuple[Image.Image, bool]:
    """``image`` turned upright according to its EXIF orientation (ignored if broken), and
    whether that swapped its width and height (a quarter turn, orientations 5-8)."""
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG)
        if orientation in (None, 1):
            return image, False
        upright = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return image, False
    return upright, upright is not image and orientation in _QUARTER_TURNS


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB image; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image)
    try:
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGB", rgba.size, _WHITE)
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise ImageRejected("unsupported_format", f"cannot convert mode {mode} to RGB") from exc


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grey image to 8 bits and return it as RGB."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        peak = float(values.max()) if values.size else 0.0
        values = values * 255.0 if peak <= 1.0 else values
    elif values.size and values.max() > 255:
        values = values / 257.0  # 16-bit range onto 8 bits
    grey = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


# --------------------------------------------------------------------------------------
# Embedded generation metadata
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedMetadata:
    """The generation metadata found inside an image file.

    ``source`` says where it came from: ``a1111`` (PNG ``parameters``), ``comfyui``
    (``prompt`` / ``workflow`` JSON), ``exif`` (UserComment or JPEG comment), or ``""``
    when nothing was found. ``params`` holds the settings (A1111 names: ``Steps``,
    ``Sampler``, ``CFG scale``, ``Seed``, ``Model`` ...); numbers are parsed as numbers.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    source: str = ""


_A1111_PARAM: Final = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE_PREFIX: Final = "Negative prompt:"
_COMFY_TEXT_KEYS: Final = ("text", "text_g", "text_l", "prompt", "string", "value")
_COMFY_SAMPLER_PARAMS: Final = {
    "seed": "Seed",
    "noise_seed": "Seed",
    "steps": "Steps",
    "cfg": "CFG scale",
    "sampler_name": "Sampler",
    "scheduler": "Schedule type",
    "denoise": "Denoising strength",
}
_COMFY_MODEL_KEYS: Final = ("ckpt_name", "unet_name")
_MAX_LINK_DEPTH: Final = 16


def read_embedded_metadata(source: bytes | Path) -> EmbeddedMetadata:
    """Return the prompt and settings embedded in an image file, or an empty value.

    Reads only the header part the format needs (no pixel is decoded). Never raises:
    unreadable, malformed or foreign data gives ``EmbeddedMetadata()``.
    """
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            return _metadata_from_stream(io.BytesIO(bytes(source)))
        with open(source, "rb") as handle:
            return _metadata_from_stream(handle)
    except ImageRejected:
        return EmbeddedMetadata()
    except Exception as exc:  # noqa: BLE001 - the contract is "never raise on weird data"
        logger.debug("no embedded metadata in %s: %s", _describe(source), exc)
        return EmbeddedMetadata()


def _describe(source: bytes | Path) -> str:
    return str(source) if isinstance(source, Path) else f"<{len(source)} bytes>"


def _metadata_from_stream(stream: IO[bytes]) -> EmbeddedMetadata:
    image = _open_checked(stream, DEFAULT_LIMITS)
    info = image.info
    if isinstance(info.get("parameters"), str):
        return _with_source(parse_a1111_parameters(info["parameters"]), "a1111")
    if isinstance(info.get("prompt"), str) or isinstance(info.get("workflow"), str):
        found = parse_comfyui(info.get("prompt"), info.get("workflow"))
        if found.prompt is not None:
            return found
    return _metadata_from_exif(image)


def _with_source(found: EmbeddedMetadata, source: str) -> EmbeddedMetadata:
    if found.prompt is None and found.negative_prompt is None and not found.params:
        return EmbeddedMetadata()
    return EmbeddedMetadata(found.prompt, found.negative_prompt, found.params, source)


def _metadata_from_exif(image: Image.Image) -> EmbeddedMetadata:
    """Read A1111 text from EXIF UserComment / JPEG comment, or ComfyUI JSON from IFD0."""
    exif = image.getexif()
    comfy = _comfy_from_ifd0(exif)
    if comfy.prompt is not None:
        return comfy
    comment = decode_user_comment(exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT_TAG))
    if comment is None:
        comment = decode_user_comment(image.info.get("comment"))
    if comment is None:
        return EmbeddedMetadata()
    return _with_source(parse_a1111_parameters(comment), "exif")


def _comfy_from_ifd0(exif: Mapping[int, Any]) -> EmbeddedMetadata:
    """ComfyUI's WebP/JPEG savers put ``Prompt:{json}`` / ``Workflow:{json}`` in IFD0 strings."""
    found: dict[str, str] = {}
    for value in exif.values():
        if isinstance(value, str) and ":" in value[:10]:
            key, _, payload = value.partition(":")
            if key.lower() in ("prompt", "workflow"):
                found[key.lower()] = payload
    if not found:
        return EmbeddedMetadata()
    return parse_comfyui(found.get("prompt"), found.get("workflow"))


def decode_user_comment(raw: object) -> str | None:
    """Decode an EXIF UserComment (8-byte charset header, then text) to a string, or None.

    Handles ``UNICODE\\0`` (UTF-16, endianness from a BOM or from where the zero bytes
    are), ``ASCII``, ``JIS``, an all-zero header, and headerless UTF-8.
    """
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, bytes) and raw:
        header, body = raw[:8], raw[8:]
        if header == b"UNICODE\x00":
            text = body.decode(_utf16_codec(body), errors="replace")
        elif header == b"ASCII\x00\x00\x00" or header == b"\x00" * 8:
            text = body.decode("utf-8", errors="replace")
        elif header == b"JIS\x00\x00\x00\x00\x00":
            text = body.decode("shift_jis", errors="replace")
        else:
            text = raw.decode("utf-8", errors="replace")
    else:
        return None
    text = text.replace("\x00", "").strip()
    return text or None


def _utf16_codec(body: bytes) -> str:
    if body.startswith(b"\xfe\xff"):
        return "utf-16"  # the codec reads and drops the BOM
    if body.startswith(b"\xff\xfe"):
        return "utf-16"
    sample = body[:64]
    # Latin text in UTF-16 BE has its zero bytes at even offsets, LE at odd ones.
    zeros_even = sample[0::2].count(0)
    zeros_odd = sample[1::2].count(0)
    return "utf-16-le" if zeros_odd > zeros_even else "utf-16-be"


def parse_a1111_parameters(text: str) -> EmbeddedMetadata:
    """Parse AUTOMATIC1111's "parameters" text: prompt, ``Negative prompt:``, settings line.

    The settings line is the last line when it holds at least three ``Key: value`` pairs
    (A1111's own rule). Quoted values are unquoted; numbers become int / float.
    """
    lines = text.strip().replace("\r\n", "\n").split("\n")
    params: dict[str, Any] = {}
    if lines and len(_A1111_PARAM.findall(lines[-1])) >= 3:
        params = _parse_settings_line(lines.pop())
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(_NEGATIVE_PREFIX):
            target = negative_lines
            line = line[len(_NEGATIVE_PREFIX) :]
        target.append(line)
    prompt = "\n".join(prompt_lines).strip() or None
    negative = "\n".join(negative_lines).strip() or None
    return EmbeddedMetadata(prompt, negative, params, "a1111")


def _parse_settings_line(line: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, raw in _A1111_PARAM.findall(line):
        value = raw.strip()
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        params[key.strip()] = _number_or_text(value)
    return params


def _number_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def parse_comfyui(prompt_json: str | None, workflow_json: str | None) -> EmbeddedMetadata:
    """Find the positive and negative prompts in ComfyUI's ``prompt`` (API) or ``workflow`` JSON.

    Follows the sampler's ``positive`` / ``negative`` links to their text encoders (through
    conditioning nodes and primitive text nodes); without a sampler, the first text-encode
    node (by node id) gives the prompt. Returns an empty value for anything unexpected.
    """
    nodes = _comfy_api_nodes(prompt_json)
    if not nodes:
        nodes = _comfy_workflow_nodes(workflow_json)
    if not nodes:
        return EmbeddedMetadata()
    prompt, negative, params = _comfy_prompts(nodes)
    if prompt is None:
        prompt = _first_text_encode(nodes)
    return _with_source(EmbeddedMetadata(prompt, negative, params), "comfyui")


def _loads_dict(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _comfy_api_nodes(prompt_json: str | None) -> dict[str, dict[str, Any]]:
    graph = _loads_dict(prompt_json)
    return {
        str(key): node
        for key, node in graph.items()
        if isinstance(node, dict) and isinstance(node.get("inputs"), dict)
    }


def _comfy_workflow_nodes(workflow_json: str | None) -> dict[str, dict[str, Any]]:
    """Convert ComfyUI's UI graph (nodes + links) into the API shape this module reads."""
    graph = _loads_dict(workflow_json)
    origins: dict[Any, list[str | int]] = {}
    for link in graph.get("links") or []:
        if isinstance(link, list) and len(link) >= 3:
            origins[link[0]] = [str(link[1]), link[2]]
        elif isinstance(link, dict) and "id" in link:
            origins[link["id"]] = [str(link.get("origin_id")), link.get("origin_slot", 0)]
    nodes: dict[str, dict[str, Any]] = {}
    for node in graph.get("nodes") or []:
        if not isinstance(node, dict) or "id" not in node:
            continue
        kind = str(node.get("type", ""))
        inputs: dict[str, Any] = {}
        widgets = node.get("widgets_values")
        if isinstance(widgets, list) and widgets and isinstance(widgets[0], str):
            inputs["text" if "TextEncode" in kind else "value"] = widgets[0]
        if kind == "KSampler" and isinstance(widgets, list) and len(widgets) >= 7:
            keys = ("seed", "", "steps", "cfg", "sampler_name", "scheduler", "denoise")
            inputs.update({k: v for k, v in zip(keys, widgets, strict=False) if k})
        for slot in node.get("inputs") or []:
            if isinstance(slot, dict) and slot.get("link") in origins:
                inputs[str(slot.get("name"))] = origins[slot["link"]]
        nodes[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return nodes


def _comfy_prompts(
    nodes: dict[str, dict[str, Any]],
) -> tuple[str | None, str | None, dict[str, Any]]:
    """Return (positive, negative, params) from the first sampler node, by node id."""
    params: dict[str, Any] = {}
    for node in _sorted_nodes(nodes):
        for key in _COMFY_MODEL_KEYS:
            if isinstance(node["inputs"].get(key), str):
                params.setdefault("Model", node["inputs"][key])
    for node in _sorted_nodes(nodes):
        inputs = node["inputs"]
        if "positive" not in inputs:
            continue
        for key, name in _COMFY_SAMPLER_PARAMS.items():
            value = inputs.get(key)
            if isinstance(value, int | float | str) and not isinstance(value, bool):
                params.setdefault(name, value)
        positive = _comfy_text(nodes, inputs.get("positive"), 0)
        negative = _comfy_text(nodes, inputs.get("negative"), 0)
        return positive, negative, params
    return None, None, params


def _sorted_nodes(nodes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def order(key: str) -> tuple[int, int | str]:
        return (0, int(key)) if key.isdigit() else (1, key)

    return [nodes[key] for key in sorted(nodes, key=order)]


def _comfy_text(nodes: dict[str, dict[str, Any]], ref: Any, depth: int) -> str | None:
    """Follow a link ``[node_id, slot]`` to the text that feeds it, or None."""
    if isinstance(ref, str):
        return ref.strip() or None
    if depth > _MAX_LINK_DEPTH or not isinstance(ref, list) or not ref:
        return None
    node = nodes.get(str(ref[0]))
    if node is None:
        return None
    inputs = node["inputs"]
    for key in _COMFY_TEXT_KEYS:
        if key in inputs:
            text = _comfy_text(nodes, inputs[key], depth + 1)
            if text:
                return text
    for key, value in inputs.items():
        if "conditioning" in key.lower():
            text = _comfy_text(nodes, value, depth + 1)
            if text:
                return text
    return None


def _first_text_encode(nodes: dict[str, dict[str, Any]]) -> str | None:
    for node in _sorted_nodes(nodes):
        if "TextEncode" in str(node.get("class_type", "")):
            for key in _COMFY_TEXT_KEYS:
                value = node["inputs"].get(key)
                if isinstance(value, str) and value.strip():
                    return value.strip()
    return None
