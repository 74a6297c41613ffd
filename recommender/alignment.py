"""Text-image alignment scores of (image, text) pairs, for curating data.

A score is 100 x the CLIP cosine of the image and the text (``indexer.alignment``). Pairs come
from the HTTP API (an indexed image by id, or uploaded bytes) or from a CSV file with
``image`` and ``text`` columns (``lookalike score``). Everything here needs a CLIP model:
without one, ``ClipRequiredError`` says so and how to provide it.
"""

from __future__ import annotations

import csv
import logging
import math
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm import tqdm

from indexer.alignment import ALIGNMENT_SCALE, TextImageEncoder, alignment_scores, scoring_text
from indexer.batching import batched
from indexer.encoders.base import Encoder
from indexer.errors import ImageRejected
from indexer.images import ImageLimits, decode_image
from recommender.errors import RecommenderError, UnknownItemError, UnsupportedQueryError

if TYPE_CHECKING:
    from recommender.engine import Engine

log = logging.getLogger(__name__)

HOW_TO_GET_CLIP = (
    "Index the catalog with a profile that has a `clip` space (`lookalike index DUMP "
    "--profile default`, or add `--clip-model DIR` to any profile: a CLIP checkpoint as "
    "transformers' save_pretrained writes it, or a hub id cached locally with HF_HUB_OFFLINE=1)."
)
PERCENTILES = (5, 25, 50, 75, 95)


class ClipRequiredError(UnsupportedQueryError):
    """A feature that needs a CLIP model (alignment scores) where there is none.

    ``spaces``: the catalog's spaces (None when there is no catalog to speak of).
    """

    def __init__(self, what: str, spaces: Sequence[str] | None, how: str = HOW_TO_GET_CLIP) -> None:
        if spaces is None:
            lacking = "and no catalog with a `clip` space or CLIP model was given"
        else:
            have = ", ".join(spaces) or "none"
            lacking = (
                f"and this catalog has no `clip` space (it has: {have}; "
                "the offline profile has no CLIP)"
            )
        super().__init__(f"{what} needs CLIP, {lacking}. {how}")


class PairsFileError(RecommenderError):
    """A pairs CSV that cannot be read, or lacks the ``image`` and ``text`` columns."""


def require_clip(spaces: Sequence[str], what: str) -> None:
    """Raise ``ClipRequiredError`` unless ``spaces`` include ``clip``."""
    if "clip" not in spaces:
        raise ClipRequiredError(what, spaces)


def clip_encoder(encoders: Mapping[str, Encoder], what: str) -> Encoder:
    """The ``clip`` space's encoder (both towers); ``ClipRequiredError`` when there is none."""
    encoder = encoders.get("clip")
    if encoder is None or not isinstance(encoder, TextImageEncoder):
        raise ClipRequiredError(what, list(encoders))
    return encoder


def scoring_encoder(
    catalog: Path | None, clip_model: str | None, device: str | None, dtype: str
) -> Encoder:
    """The CLIP encoder to score pairs files with: ``clip_model`` if given, else the one the
    catalog at ``catalog`` was built with; ``ClipRequiredError`` when neither has one."""
    from indexer.build import recorded_specs
    from indexer.encoders import create_encoder, get_spec

    if clip_model:
        return create_encoder(get_spec("clip"), model=clip_model, device=device, dtype=dtype)
    specs = recorded_specs(catalog) if catalog is not None else None
    if specs is not None and "clip" in specs:
        return create_encoder(specs["clip"], device=device, dtype=dtype)
    how = (
        "Name a CLIP model with --clip-model (or LOOKALIKE_CLIP_MODEL): a local directory as "
        "transformers' save_pretrained writes it, or a hub id cached locally "
        "(HF_HUB_OFFLINE=1); or point --catalog at a catalog indexed with a `clip` space "
        "(`--profile default`)."
    )
    where = None if specs is None else list(specs)
    raise ClipRequiredError("`lookalike score`", where, how)


# --------------------------------------------------------------------------- API pairs


@dataclass(frozen=True)
class ScorePair:
    """One pair to score: an indexed image (``image_id``) or image bytes, and a text."""

    text: str
    image_id: str | None = None
    image: bytes | None = None


def score_pairs(engine: Engine, pairs: Sequence[ScorePair]) -> NDArray[np.float32]:
    """Alignment scores of ``pairs``: float32 (n,), 100 x cosine, in the pairs' order.

    Indexed images use their stored CLIP embedding; uploads go through the safe decoder with
    the engine's upload limits. ``ClipRequiredError`` without a clip space,
    ``UnknownItemError`` for an unknown id, ``ImageRejected`` for a bad upload.
    """
    encoder = clip_encoder(engine.encoders, "Scoring text-image alignment")
    catalog = engine.catalog
    image_vecs = np.zeros((len(pairs), catalog.indexes["clip"].dim), dtype=np.float32)
    uploads: list[int] = []
    for i, pair in enumerate(pairs):
        if pair.image_id is not None:
            key = catalog.key_for_id(pair.image_id)
            if key is None:
                raise UnknownItemError(pair.image_id)
            image_vecs[i] = catalog.vectors("clip", [key])[0]
        else:
            uploads.append(i)
    if uploads:
        limits = engine.config.upload_limits
        images = [decode_image(pairs[i].image or b"", limits) for i in uploads]
        image_vecs[uploads] = encoder.embed_batch(images)
    return _score_texts(encoder, image_vecs, [pair.text for pair in pairs])


def _score_texts(
    encoder: Encoder, image_vecs: NDArray[np.float32], texts: Sequence[str]
) -> NDArray[np.float32]:
    assert isinstance(encoder, TextImageEncoder), "not a CLIP encoder"
    text_vecs = encoder.embed_texts([scoring_text(text) or text for text in texts])
    return alignment_scores(image_vecs, text_vecs)


# --------------------------------------------------------------------------- pairs files


@dataclass
class ScoreSummary:
    """What ``score_csv`` reports: counts, the score distribution, time and peak memory."""

    scored: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    mean: float = math.nan
    std: float = math.nan
    minimum: float = math.nan
    maximum: float = math.nan
    percentiles: dict[int, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    peak_rss_mb: float = 0.0
    out: Path | None = None

    @property
    def pairs_per_s(self) -> float:
        return self.scored / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
        skipped = sum(self.skipped.values())
        spread = " ".join(f"p{p} {v:.2f}" for p, v in self.percentiles.items())
        return (
            f"scored {self.scored} pairs, skipped {skipped}{f' ({reasons})' if reasons else ''}; "
            f"alignment mean {self.mean:.2f} (std {self.std:.2f}), {spread}; "
            f"{self.elapsed_s:.1f} s, {self.pairs_per_s:.1f} pairs/s, "
            f"peak memory {self.peak_rss_mb:.0f} MB"
            + (f"; scores in {self.out}" if self.out else "")
        )

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return round(x, 4) if math.isfinite(x) else None

        return {
            "count": self.scored,
            "skipped": dict(self.skipped),
            "mean": num(self.mean),
            "std": num(self.std),
            "min": num(self.minimum),
            "max": num(self.maximum),
            "percentiles": {f"p{p}": num(v) for p, v in self.percentiles.items()},
            "scale": ALIGNMENT_SCALE,
            "elapsed_s": round(self.elapsed_s, 3),
            "pairs_per_s": round(self.pairs_per_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "out": str(self.out) if self.out else None,
        }


def read_pairs(path: Path) -> Iterator[tuple[int, str, str]]:
    """(row number, image, text) of each row of a pairs CSV (header: ``image``, ``text``)."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise PairsFileError(f"Cannot read the pairs file {path}: {exc}") from exc
    with handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if not {"image", "text"} <= set(columns):
            raise PairsFileError(
                f"{path} needs a header row with the columns `image` and `text`; "
                f"it has {', '.join(map(repr, columns)) or 'no header'}."
            )
        try:
            for number, row in enumerate(reader, start=2):
                yield number, (row.get("image") or "").strip(), row.get("text") or ""
        except csv.Error as exc:
            raise PairsFileError(f"{path}, line {reader.line_num}: {exc}") from exc


def score_csv(
    pairs_path: Path,
    out_path: Path,
    encoder: Encoder,
    *,
    batch_size: int = 32,
    limits: ImageLimits | None = None,
    decode_workers: int = 2,
    progress: bool = False,
) -> ScoreSummary:
    """Score every (image, text) row of ``pairs_path`` into ``out_path``; returns the summary.

    Image paths are relative to the pairs file's folder (absolute ones are taken as they
    are). The output CSV has the columns ``image``, ``text``, ``score`` and ``error`` (the
    reason a row was skipped: ``missing``, ``unreadable`` or a decoder rejection). Rows are
    streamed in batches, so memory stays flat whatever the file's length.
    """
    limits = limits or ImageLimits()
    root = pairs_path.parent
    summary = ScoreSummary(out=out_path)
    scores: list[NDArray[np.float32]] = []
    started = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(unit="pair", desc="scoring", disable=not progress, dynamic_ncols=True)
    with (
        out_path.open("w", newline="", encoding="utf-8") as out,
        ThreadPoolExecutor(decode_workers, thread_name_prefix="decode") as pool,
    ):
        writer = csv.writer(out)
        writer.writerow(["image", "text", "score", "error"])
        for batch in batched(read_pairs(pairs_path), batch_size):
            loaded = list(pool.map(lambda row: _load(root, row[1], limits), batch))
            good = [i for i, (image, _) in enumerate(loaded) if image is not None]
            images = [image for image, _ in loaded if image is not None]
            got = np.full(len(batch), np.nan, dtype=np.float32)
            if good:
                image_vecs = encoder.embed_batch(images)
                got[good] = _score_texts(encoder, image_vecs, [batch[i][2] for i in good])
                scores.append(got[good])
            for (_, image, text), (_, error), score in zip(batch, loaded, got, strict=True):
                if error:
                    summary.skipped[error] += 1
                writer.writerow([image, text, "" if error else f"{score:.4f}", error or ""])
            bar.update(len(batch))
    bar.close()
    _describe(summary, np.concatenate(scores) if scores else np.zeros(0, np.float32))
    summary.elapsed_s = time.perf_counter() - started
    summary.peak_rss_mb = peak_rss_mb()
    return summary


def _load(root: Path, name: str, limits: ImageLimits) -> tuple[Image.Image | None, str | None]:
    """The decoded image at ``name`` (relative to ``root``), or None and why not."""
    if not name:
        return None, "missing"
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError:
        return None, "unreadable"
    try:
        return decode_image(data, limits), None
    except ImageRejected as exc:
        return None, exc.reason


def _describe(summary: ScoreSummary, scores: NDArray[np.float32]) -> None:
    summary.scored = len(scores)
    if not len(scores):
        return
    values = scores.astype(np.float64)
    summary.mean, summary.std = float(values.mean()), float(values.std())
    summary.minimum, summary.maximum = float(values.min()), float(values.max())
    summary.percentiles = {
        p: float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here
