"""Prompt-image alignment: how well an image matches its prompt, CLIP-style.

The score is 100 x the cosine of the CLIP image and text embeddings (CLIP's logit scale), so
it reads like CLIPScore without its clipping at 0. Texts are embedded as the text space sees
prompts: emphasis syntax and LoRA tags removed (``indexer.text.clean_prompt``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from indexer.catalog import Catalog
from indexer.encoders.base import Vectors
from indexer.text import clean_prompt

log = logging.getLogger(__name__)

ALIGNMENT_SCALE = 100.0
"""Cosine -> score: CLIP's logit scale."""


@runtime_checkable
class TextImageEncoder(Protocol):
    """What scoring stored images needs of a CLIP encoder: its text tower."""

    def embed_texts(self, texts: Sequence[str]) -> Vectors: ...


def scoring_text(text: str | None) -> str:
    """The text CLIP scores: the prompt without emphasis syntax ("" when nothing is left)."""
    return clean_prompt(text)


def alignment_scores(image_vecs: Vectors, text_vecs: Vectors) -> NDArray[np.float32]:
    """Row-wise 100 x cosine of two float32 (n, dim) L2-normalised blocks: float32 (n,)."""
    dots = np.einsum("ij,ij->i", image_vecs, text_vecs, dtype=np.float64)
    return (ALIGNMENT_SCALE * dots).astype(np.float32)


def align_catalog(
    catalog: Catalog,
    encoder: TextImageEncoder,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> int:
    """Score every item of ``catalog`` that has no alignment score yet; returns how many.

    Image embeddings are the ones stored in the ``clip`` space; only prompts go through the
    text tower. Items without a prompt are stored as unscored (NULL) so they are not retried.
    Each batch is one transaction: an interrupted run resumes where it stopped.
    """
    done, last = 0, -1
    bar = tqdm(unit="item", desc="alignment", disable=not progress, dynamic_ncols=True)
    try:
        while rows := catalog.items_to_align(last, batch_size):
            last = rows[-1][0]
            keys = [key for key, _ in rows]
            texts = [scoring_text(prompt) for _, prompt in rows]
            scores = np.full(len(rows), np.nan, dtype=np.float32)
            present = [i for i, text in enumerate(texts) if text]
            if present:
                image_vecs = catalog.vectors("clip", [keys[i] for i in present])
                text_vecs = encoder.embed_texts([texts[i] for i in present])
                scores[present] = alignment_scores(image_vecs, text_vecs)
            catalog.set_alignment(keys, scores.tolist())
            done += len(present)
            bar.update(len(rows))
    finally:
        bar.close()
    if done:
        log.info("scored the prompt-image alignment of %d items", done)
    return done
