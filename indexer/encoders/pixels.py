"""A weight-free image descriptor for the ``visual`` space of the ``offline`` profile.

This is a fallback, and honest about it: it sees colours, where they sit, and which way
edges run, so it finds images with a similar palette, composition and texture. It does not
know what is in a picture (a red car and a red dress can be close); DINOv2 does. Use it when
no model weights can be had.

Recipe (version ``pixels-v1``; any change to it must bump ``PIXELS_VERSION``):

1. Squash the image to 64 x 64 RGB (PIL box filter) and take its HSV twin.
2. Colour, 52 dims, over every other pixel (32 x 32): soft (linearly interpolated)
   histogram of hue (8, circular) x saturation (2) x value (3) for colourful pixels, and of
   value (4) for grey ones; a pixel's weight moves smoothly from grey to colour with its
   chroma (S x V). L1-normalised, then sqrt.
3. Layout, 48 dims: a 4 x 4 thumbnail (averaged in linear light) in CIELAB, minus its mean
   colour (the palette is block 2's job), L2-normalised with a floor so a flat image is not
   blown up into noise.
4. Edges, 189 dims: gradient-orientation histograms (8 unsigned orientations, soft, weighted
   by magnitude) plus one "flat" bin per cell, over a 4 x 4 grid at 64 px, 2 x 2 at 32 px and
   1 x 1 at 16 px. Each cell L1-normalised, then sqrt; each scale weighs the same.
5. Blocks weighted (squared shares: colour 0.4, layout 0.2, edges 0.4), concatenated and
   L2-normalised: float32, ``PIXELS_DIM`` = 289.

numpy only, vectorised over the batch, deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from indexer.encoders._imaging import as_rgb
from indexer.encoders.base import EncoderSpec, ImageEncoder, Vectors, l2_normalise

log = logging.getLogger(__name__)

PIXELS_VERSION = "pixels-v1"
WORK_SIZE = 64
HUE_BINS, SAT_BINS, VAL_BINS, GREY_BINS = 8, 2, 3, 4
COLOUR_DIM = HUE_BINS * SAT_BINS * VAL_BINS + GREY_BINS
LAYOUT_GRID = 4
LAYOUT_DIM = LAYOUT_GRID * LAYOUT_GRID * 3
ORIENT_BINS = 8
EDGE_LEVELS = ((64, 4), (32, 2), (16, 1))
"""(side in pixels, cells per side) of each scale of the edge pyramid."""
EDGE_DIM = (ORIENT_BINS + 1) * sum(cells * cells for _, cells in EDGE_LEVELS)
PIXELS_DIM = COLOUR_DIM + LAYOUT_DIM + EDGE_DIM
BLOCK_SHARES = (0.4, 0.2, 0.4)

_CHROMA_GREY, _CHROMA_COLOUR = 0.06, 0.18  # chroma below: grey; above: colour; ramp between
_FLAT_MAGNITUDE = 0.02  # per-pixel gradient (intensity 0..1) that counts as much as "flat"
_LAYOUT_FLOOR = 0.1
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_RGB_TO_XYZ = np.array(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
    dtype=np.float64,
)
_D65 = np.array([0.95047, 1.0, 1.08883])

FloatArray = NDArray[np.float32]


class PixelsEncoder(ImageEncoder):
    """Weight-free fallback descriptor (colour, layout, edges); see the module docstring.

    ``preprocess(images)`` -> uint8 (n, 64, 64, 6) RGB + HSV; ``forward(batch)`` -> float32
    (n, 289), L2-normalised. About 1-2 ms per 256 px image on one core, preprocess included.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int = 256,
    ) -> None:
        """``device`` and ``dtype`` are accepted for a uniform factory and ignored (numpy, fp32)."""
        super().__init__(spec, batch_size=batch_size)
        self.min_side = WORK_SIZE

    def _load(self) -> None:
        """Nothing to load."""

    def preprocess(self, items: Sequence[Image.Image]) -> NDArray[np.uint8]:
        """PIL images -> uint8 (n, 64, 64, 6): squashed RGB, then the same pixels as HSV."""
        out = np.empty((len(items), WORK_SIZE, WORK_SIZE, 6), dtype=np.uint8)
        for i, image in enumerate(items):
            small = as_rgb(image).resize(
                (WORK_SIZE, WORK_SIZE), Image.Resampling.BOX, reducing_gap=2.0
            )
            out[i, :, :, :3] = np.asarray(small)
            out[i, :, :, 3:] = np.asarray(small.convert("HSV"))
        return out

    def forward(self, batch: NDArray[np.uint8]) -> Vectors:
        """uint8 (n, 64, 64, 6) -> float32 (n, 289), L2-normalised."""
        rgb = batch[..., :3].astype(np.float32) / 255.0
        # every other pixel of the box-filtered 64 x 64 is plenty for a 52-bin histogram
        hsv = batch[:, ::2, ::2, 3:].astype(np.float32) / 255.0
        blocks = (colour_block(hsv), layout_block(rgb), edge_block(rgb))
        weighted = [
            np.sqrt(share) * block for share, block in zip(BLOCK_SHARES, blocks, strict=True)
        ]
        return l2_normalise(np.concatenate(weighted, axis=1))


def _soft_bins(
    x: FloatArray, bins: int, *, circular: bool
) -> tuple[tuple[NDArray[np.intp], FloatArray], tuple[NDArray[np.intp], FloatArray]]:
    """Linear soft assignment of values in [0, 1] to ``bins`` bins centred at (k + 0.5) / bins.

    Returns ((lower bin, its weight), (upper bin, its weight)); weights sum to 1.
    """
    pos = x * bins - 0.5
    lower = np.floor(pos)
    frac = (pos - lower).astype(np.float32)
    lo = lower.astype(np.intp)
    hi = lo + 1
    if circular:
        lo %= bins
        hi %= bins
    else:
        np.clip(lo, 0, bins - 1, out=lo)
        np.clip(hi, 0, bins - 1, out=hi)
    return (lo, 1.0 - frac), (hi, frac)


def colour_block(hsv: FloatArray) -> FloatArray:
    """HSV in [0, 1], (n, H, W, 3) -> (n, 52): sqrt of the L1-normalised soft histogram."""
    n = hsv.shape[0]
    h, s, v = (hsv[..., c].reshape(n, -1) for c in range(3))
    base = (np.arange(n, dtype=np.intp) * COLOUR_DIM)[:, None]
    colourful = np.clip((s * v - _CHROMA_GREY) / (_CHROMA_COLOUR - _CHROMA_GREY), 0.0, 1.0)
    indices, weights = [], []
    hue, sat, val = (
        _soft_bins(h, HUE_BINS, circular=True),
        _soft_bins(s, SAT_BINS, circular=False),
        _soft_bins(v, VAL_BINS, circular=False),
    )
    for hb, hw in hue:
        for sb, sw in sat:
            for vb, vw in val:
                indices.append(base + (hb * SAT_BINS + sb) * VAL_BINS + vb)
                weights.append(colourful * hw * sw * vw)
    for gb, gw in _soft_bins(v, GREY_BINS, circular=False):
        indices.append(base + HUE_BINS * SAT_BINS * VAL_BINS + gb)
        weights.append((1.0 - colourful) * gw)
    counts = np.bincount(
        np.concatenate([i.ravel() for i in indices]),
        weights=np.concatenate([w.ravel() for w in weights]),
        minlength=n * COLOUR_DIM,
    )
    hist = np.asarray(counts, dtype=np.float64).reshape(n, COLOUR_DIM)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(hist).astype(np.float32)


def _srgb_to_linear(rgb: FloatArray) -> FloatArray:
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _linear_to_lab(linear: NDArray[np.floating]) -> NDArray[np.float64]:
    """Linear RGB (..., 3) -> CIELAB (D65), L in 0..100."""
    xyz = linear.astype(np.float64) @ _RGB_TO_XYZ.T / _D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.empty_like(f)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def layout_block(rgb: FloatArray) -> FloatArray:
    """RGB in [0, 1], (n, 64, 64, 3) -> (n, 48): mean-removed 4 x 4 Lab thumbnail, floored L2."""
    n, side = rgb.shape[0], rgb.shape[1]
    cell = side // LAYOUT_GRID
    linear = _srgb_to_linear(rgb).reshape(n, LAYOUT_GRID, cell, LAYOUT_GRID, cell, 3)
    lab = _linear_to_lab(linear.mean(axis=(2, 4))) / 100.0
    lab -= lab.mean(axis=(1, 2), keepdims=True)
    flat = lab.reshape(n, LAYOUT_DIM)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return (flat / np.maximum(norms, _LAYOUT_FLOOR)).astype(np.float32)


def _central_differences(gray: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(d/dx, d/dy) of (n, S, S): central differences, one-sided at the border (x2 scale)."""
    gx = np.empty_like(gray)
    gy = np.empty_like(gray)
    np.subtract(gray[:, :, 2:], gray[:, :, :-2], out=gx[:, :, 1:-1])
    np.subtract(gray[:, 2:, :], gray[:, :-2, :], out=gy[:, 1:-1, :])
    gx[:, :, 0] = gray[:, :, 1] - gray[:, :, 0]
    gx[:, :, -1] = gray[:, :, -1] - gray[:, :, -2]
    gy[:, 0, :] = gray[:, 1, :] - gray[:, 0, :]
    gy[:, -1, :] = gray[:, -1, :] - gray[:, -2, :]
    return gx, gy


def _orientation_cells(gray: FloatArray, cells: int) -> FloatArray:
    """Grey (n, S, S) -> (n, cells * cells * 9): per cell sqrt of the L1-normalised histogram."""
    n, side = gray.shape[0], gray.shape[1]
    gx, gy = _central_differences(gray)
    magnitude = (np.hypot(gx, gy) * 0.5).reshape(n, -1)
    angle = (np.arctan2(gy, gx).reshape(n, -1) % np.pi) / np.pi
    per_cell = ORIENT_BINS + 1
    rows = np.arange(side) * cells // side
    cell_of = (rows[:, None] * cells + rows[None, :]).reshape(-1) * per_cell
    base = (np.arange(n, dtype=np.intp) * cells * cells * per_cell)[:, None] + cell_of[None, :]
    (lo, wlo), (hi, whi) = _soft_bins(angle.astype(np.float32), ORIENT_BINS, circular=True)
    counts = np.bincount(
        np.concatenate([(base + lo).ravel(), (base + hi).ravel()]),
        weights=np.concatenate([(magnitude * wlo).ravel(), (magnitude * whi).ravel()]),
        minlength=n * cells * cells * per_cell,
    )
    hist = np.asarray(counts, dtype=np.float64).reshape(n, cells * cells, per_cell)
    hist[:, :, ORIENT_BINS] += _FLAT_MAGNITUDE * (side // cells) ** 2  # every pixel adds "flat"
    hist /= hist.sum(axis=2, keepdims=True)
    return (np.sqrt(hist).reshape(n, -1) / cells).astype(np.float32)  # each scale unit-norm


def edge_block(rgb: FloatArray) -> FloatArray:
    """RGB in [0, 1], (n, 64, 64, 3) -> (n, 189): orientation histograms at three scales."""
    gray = rgb @ _LUMA
    n = gray.shape[0]
    parts = []
    for side, cells in EDGE_LEVELS:
        factor = gray.shape[1] // side
        level = (
            gray.reshape(n, side, factor, side, factor).mean(axis=(2, 4)) if factor > 1 else gray
        )
        parts.append(_orientation_cells(level.astype(np.float32), cells))
    return np.concatenate(parts, axis=1) / np.float32(np.sqrt(len(EDGE_LEVELS)))
