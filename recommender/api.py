"""The typed values that cross the engine facade (engine.py): queries, pages, feedback, info."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from recommender.retrieve import Filters

Pick = Literal["top", "explore"]


@dataclass(frozen=True)
class ImageQuery:
    """An uploaded image, as raw bytes (decoded by the engine through the safe decoder)."""

    data: bytes


@dataclass(frozen=True)
class ItemQuery:
    """An image already in the catalog, by its id."""

    image_id: str


@dataclass(frozen=True)
class TextQuery:
    """A text prompt: searched through CLIP when the catalog has it, else the prompt index."""

    text: str


Query = ImageQuery | ItemQuery | TextQuery


@dataclass(frozen=True)
class PageItem:
    """One image of a page. ``nsfw_level`` is civitai's name (None, Soft, Mature, X, XXX)."""

    id: str
    score: float
    pick: Pick
    prompt: str | None
    tags: tuple[str, ...]
    width: int | None
    height: int | None
    nsfw_level: str
    generated: bool


@dataclass(frozen=True)
class Page:
    """A page of the scroll. ``sparse``: fewer unseen candidates passed the similarity floor
    than a page holds. ``generating``: new images are being made for this session."""

    session_id: str
    items: list[PageItem]
    sparse: bool
    generating: bool = False


@dataclass(frozen=True)
class FeedbackEvent:
    event_id: str
    image_id: str
    dwell_ms: float


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int
    duplicates: int


@dataclass(frozen=True)
class StoredFeedback:
    """Events ``Engine.store_feedback`` committed for a session, not yet steered with: the
    newly stored ones, in the order sent, and how many were already known."""

    session_id: str
    events: tuple[FeedbackEvent, ...]
    duplicates: int


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    user_id: str | None
    served: int
    feedback_events: int
    terms: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Neighbour:
    """A plain k-NN hit (clip-retrieval compatible answers)."""

    id: str
    similarity: float
    prompt: str | None


__all__ = [
    "FeedbackEvent",
    "FeedbackResult",
    "Filters",
    "ImageQuery",
    "ItemQuery",
    "Neighbour",
    "Page",
    "PageItem",
    "Pick",
    "Query",
    "SessionInfo",
    "StoredFeedback",
    "TextQuery",
]
