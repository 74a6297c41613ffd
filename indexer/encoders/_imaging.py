"""PIL-only image preparation shared by the image encoders (no torch, safe in worker threads)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def as_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode (``decode_image`` already returns RGB; this guards other callers)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(
    image: Image.Image, resize: int, crop: int, resample: Image.Resampling
) -> Image.Image:
    """Resize the short side to ``resize``, then take the centred ``crop`` x ``crop`` square.

    Done as one PIL resample of just the source region the crop covers (same result as
    resize-then-crop, as the filter still reads pixels just outside the region), so the cost
    scales with the output, not with the intermediate resized image.
    """
    width, height = image.size
    # torchvision / transformers rounding of the resized size
    new_w = resize if width <= height else int(resize * width / height)
    new_h = resize if height <= width else int(resize * height / width)
    sx, sy = width / new_w, height / new_h
    left, top = float(round((new_w - crop) / 2.0)), float(round((new_h - crop) / 2.0))
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return image.resize((crop, crop), resample, box=box)


def crops_u8(
    images: Sequence[Image.Image], resize: int, crop: int, resample: Image.Resampling
) -> NDArray[np.uint8]:
    """uint8 (n, crop, crop, 3) RGB array of ``resize_center_crop`` over a batch."""
    out = np.empty((len(images), crop, crop, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(resize_center_crop(as_rgb(image), resize, crop, resample))
    return out
