"""Metadata filters of a search, shared by every vector store.

The FAISS store applies them as a boolean mask over item keys (``Catalog.allowed_mask``); a
store that holds the metadata itself (Milvus) turns them into its own filter expression.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        # Tuples whatever a caller passed (a list, a set): filters are hashable, since the
        # catalog keeps each filter set's mask.
        for name in ("base_models", "tags_required", "tags_excluded"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

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
class ItemAttributes:
    """What the filters look at for one item, as a store that filters by itself keeps it."""

    nsfw_level: int
    base_model: str | None
    tags: tuple[str, ...]
    alignment: float | None = None  # None: no prompt, or not scored yet
