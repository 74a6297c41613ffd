"""The item model shared by the dump readers and the catalog."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# civitai's NSFW scale, lowest first. Stored as the index in this tuple.
NSFW_LEVELS: tuple[str, ...] = ("None", "Soft", "Mature", "X", "XXX")


def nsfw_level_from_any(value: Any) -> int:
    """Map civitai's many spellings of an NSFW level onto 0..4.

    Accepts the names above (any case), booleans (``nsfw: true`` -> Mature), ``browsingLevel``
    bit flags (1 PG, 2 PG-13, 4 R, 8 X, 16 XXX, 32 Blocked), and the ratings of booru-style
    dumps. A value it cannot read counts as the top level: erring on the safe side, a filter
    that asks for safe images leaves it out.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        return 2 if value else 0
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return len(NSFW_LEVELS) - 1
        flags = int(value)
        if flags <= 0:
            return 0
        # browsingLevel is a bit set; the highest bit is the level.
        return min(flags.bit_length() - 1, len(NSFW_LEVELS) - 1)
    text = "".join(str(value).lower().split()).replace("_", "-")
    if text.isascii() and text.isdigit():
        return nsfw_level_from_any(int(text))
    return _NSFW_ALIASES.get(text, len(NSFW_LEVELS) - 1)


_NSFW_ALIASES: dict[str, int] = {
    **{name.lower(): level for level, name in enumerate(NSFW_LEVELS)},
    "false": 0,
    "true": 2,  # as the boolean
    "pg": 0,
    "g": 0,
    "safe": 0,
    "sfw": 0,
    "general": 0,
    "pg13": 1,
    "pg-13": 1,
    "sensitive": 1,
    "r": 2,
    "questionable": 2,
    "nsfw": 2,
    "r18": 3,
    "r-18": 3,
    "explicit": 3,
    "blocked": 4,
}


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
    stats: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # The id its image file gets when indexed bare (its path under the dump root without the
    # extension), for a record read from metadata: an item indexed under it before the
    # metadata came takes this record's id. None for a bare image.
    bare_id: str | None = None


@dataclass(frozen=True)
class SkippedEntry:
    """Something in the dump that was not indexed, and why (``reason`` is a short code)."""

    path: str
    reason: str
    detail: str = ""
