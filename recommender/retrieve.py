"""k-NN over a catalog space with metadata filters and exclusion of what a session has seen.

Filters become one boolean mask over item keys (built from the catalog's in-memory columns and
tag postings) that FAISS applies while it searches, so a filtered search never comes back short
because the nearest neighbours happened to be filtered out.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from indexer.catalog import Catalog
from recommender.alignment import require_clip


@dataclass(frozen=True)
class Filters:
    """Metadata filters of a search. Empty fields filter nothing.

    ``max_nsfw_level`` is on civitai's scale 0 None, 1 Soft, 2 Mature, 3 X, 4 XXX;
    an item must carry every tag in ``tags_required`` and none in ``tags_excluded``.
    ``min_alignment``: the least prompt-image alignment score (100 x CLIP cosine) an item must
    have; items without a score (no prompt) are left out. Needs a ``clip`` space.
    """

    max_nsfw_level: int | None = None
    base_models: tuple[str, ...] = ()
    tags_required: tuple[str, ...] = ()
    tags_excluded: tuple[str, ...] = ()
    min_alignment: float | None = None

    @property
    def empty(self) -> bool:
        return (
            self.max_nsfw_level is None
            and not self.base_models
            and not self.tags_required
            and not self.tags_excluded
            and self.min_alignment is None
        )


@dataclass(frozen=True)
class Candidates:
    """Search results, best first: ``keys`` int64 (n,), ``scores`` float32 (n,) cosine."""

    keys: NDArray[np.int64]
    scores: NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.keys)


def allowed_mask(catalog: Catalog, filters: Filters) -> NDArray[np.bool_] | None:
    """Boolean mask over item keys of what ``filters`` allow; None when they allow everything."""
    if filters.empty:
        return None
    columns = catalog.columns
    mask = columns.live.copy()
    if filters.max_nsfw_level is not None:
        mask &= columns.nsfw_level <= filters.max_nsfw_level
    if filters.base_models:
        codes = [
            columns.base_model_codes[m]
            for m in filters.base_models
            if m in columns.base_model_codes
        ]
        mask &= np.isin(columns.base_model, np.array(codes, dtype=np.int32))
    for tag in filters.tags_required:
        has_tag = np.zeros_like(mask)
        keys = catalog.keys_with_tags([tag])
        has_tag[keys[keys < len(mask)]] = True
        mask &= has_tag
    if filters.tags_excluded:
        keys = catalog.keys_with_tags(filters.tags_excluded)
        mask[keys[keys < len(mask)]] = False
    if filters.min_alignment is not None:
        require_clip(catalog.spaces, "The min_alignment filter")
        scores = catalog.alignment_scores()[: len(mask)]
        aligned = np.zeros_like(mask)
        aligned[: len(scores)] = scores >= filters.min_alignment  # NaN (no score) is False
        mask &= aligned
    return mask


def retrieve(
    catalog: Catalog,
    space: str,
    query: NDArray[np.float32],
    k: int = 100,
    *,
    filters: Filters | None = None,
    seen: Collection[int] = (),
) -> Candidates:
    """The ``k`` nearest unseen items to ``query`` (float32 (dim,), L2-normalised) in ``space``."""
    mask = allowed_mask(catalog, filters or Filters())
    scores, keys = catalog.search(space, query[None, :], k, allowed=mask, exclude=seen)
    found = keys[0] >= 0
    return Candidates(keys=keys[0][found], scores=scores[0][found])
