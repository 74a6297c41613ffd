"""What a generation backend is given and what it returns (shared by every backend).

Kept apart from ``generate.py`` (the queue and the catalog side) so that a backend module
such as ``generate_diffusers.py`` imports nothing heavier than this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    """Where in the collection a session wants more images.

    ``prompt`` is built from the session's strongest prompt terms and tags. ``image_embedding``
    is the session's steered query in the catalog's ``clip`` space (unit, float32) when the
    catalog has one, else None; ``embedding_model`` names the CLIP it came from.
    ``reference_images`` are the files of the images the person dwelt on longest (best first),
    for backends whose image encoder is not the catalog's CLIP and must embed them itself.
    """

    session_id: str
    prompt: str
    terms: tuple[str, ...]
    tags: tuple[str, ...]
    count: int
    width: int
    height: int
    seed: int
    negative_prompt: str | None = None
    image_embedding: NDArray[np.float32] | None = None
    embedding_model: str | None = None
    reference_images: tuple[Path, ...] = ()
    # The highest NSFW level among the reference images: generated items inherit it.
    nsfw_level: int = 0


@dataclass
class GeneratedImage:
    """One image a backend made, with what it was made from (stored in the item's metadata).

    ``conditioning`` summarises the conditioning in a few JSON-able fields, e.g.
    ``{"image_embeds": "catalog clip (512-d)", "ip_adapter_scale": 0.6}``.
    """

    image: Image.Image
    prompt: str
    seed: int
    backend: str
    model: str | None = None
    conditioning: dict[str, Any] = field(default_factory=dict)


class ImageBackend(Protocol):
    """Turns a request into images. ``load`` may be slow (weights); ``generate`` is called
    from the generation worker thread only, one request at a time."""

    name: str

    def load(self) -> None: ...

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]: ...
