"""The item model shared by the dump readers and the catalog."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# civitai's NSFW scale, lowest first. Stored as the index in this tuple.
NSFW_LEVELS: tuple[str, ...] = ("None", "Soft", "Mature", "X", "XXX")


def nsfw_level_from_any(value: Any) -> int:
    """Map civitai's many spellings of an NSFW level onto 0..4.

    Accepts the names above (any case), booleans (``nsfw: true`` -> Mature), and
    ``browsingLevel`` bit flags (1 PG, 2 PG-13, 4 R, 8 X, 16 XXX).
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        return 2 if value else 0
    if isinstance(value, int | float):
        flags = int(value)
        if flags <= 0:
            return 0
        # browsingLevel is a bit set; the highest bit is the level.
        return min(flags.bit_length() - 1, len(NSFW_LEVELS) - 1)
    text = str(value).strip().lower()
    aliases = {
        "pg": 0,
        "none": 0,
        "safe": 0,
        "pg13": 1,
        "pg-13": 1,
        "soft": 1,
        "r": 2,
        "mature": 2,
        "x": 3,
        "xxx": 4,
    }
    if text in aliases:
        return aliases[text]
    if text.isdigit():
        return nsfw_level_from_any(int(text))
    return 0


@dataclass(frozen=True)
class DumpRecord:
    """One image of a dump with its metadata, as read from any of the dump formats.

    ``image_path`` is absolute and guaranteed to lie inside the dump root.
    ``tags`` are lower-cased, stripped and de-duplicated, in their original order.
    """

    id: str
    image_path: Path
    url: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    tags: tuple[str, ...] = ()
    nsfw_level: int = 0
    base_model: str | None = None
    model_name: str | None = None
    created_at: str | None = None
    username: str | None = None
    width: int | None = None
    height: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedEntry:
    """Something in the dump that was not indexed, and why (``reason`` is a short code)."""

    path: str
    reason: str
    detail: str = ""
