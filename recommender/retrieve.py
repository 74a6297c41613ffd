"""k-NN over a catalog space with metadata filters and exclusion of what a session has seen.

Filters are applied while the vector store searches (FAISS: a boolean mask over item keys built
from the catalog's in-memory columns and tag postings; Milvus: a filter expression), so a
filtered search never comes back short because the nearest neighbours were filtered out.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from indexer.catalog import Catalog
from indexer.filters import Filters
from recommender.alignment import require_clip


@dataclass(frozen=True)
class Candidates:
    """Search results, best first: ``keys`` int64 (n,), ``scores`` float32 (n,) cosine."""

    keys: NDArray[np.int64]
    scores: NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.keys)


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
    if filters is not None and filters.min_alignment is not None:
        require_clip(catalog.spaces, "The min_alignment filter")
    scores, keys = catalog.search(space, query[None, :], k, filters=filters, exclude=seen)
    found = keys[0] >= 0
    return Candidates(keys=keys[0][found], scores=scores[0][found])
