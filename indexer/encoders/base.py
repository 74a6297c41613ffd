"""The one small interface every encoder implements, and the frozen spec that describes it."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image

Vectors = NDArray[np.float32]
"""float32 array of shape (n, dim), each row L2-normalised."""

SPACES = ("visual", "clip", "text")


@dataclass(frozen=True)
class EncoderSpec:
    """A frozen description of an encoder: what the registry holds and the manifest records.

    ``model`` is a hub id or a local directory. ``revision`` is what the manifest compares
    (for weight-free encoders, the algorithm's version).
    """

    name: str
    family: str
    space: str
    model: str
    dim: int
    revision: str = "main"
    description: str = ""


class Encoder(ABC):
    """Turns a batch of inputs into L2-normalised float32 vectors of one space.

    Loading is lazy and explicit: ``load()`` is guarded by a lock and runs at most once;
    ``embed_batch`` calls it when needed. ``spec`` is provisional until ``load()``: loading
    may resolve the revision (hub commit, local fingerprint) and the dim of the checkpoint,
    so record ``encoder.spec`` in a manifest only after ``load()``.
    """

    modality: ClassVar[str] = "image"
    """What ``embed_batch`` takes: ``"image"`` (PIL images) or ``"text"`` (strings)."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._loaded = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def space(self) -> str:
        return self.spec.space

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True

    @abstractmethod
    def _load(self) -> None:
        """Load weights (may raise ModelNotFoundError)."""

    @abstractmethod
    def embed_batch(self, items: Sequence[Image.Image] | Sequence[str]) -> Vectors:
        """Embed a batch; returns float32 (len(items), dim), L2-normalised rows."""


class StagedEncoder(Encoder):
    """An encoder split into two stages so a pipeline can overlap them.

    ``preprocess`` is CPU work that needs no forward pass (resize, crop, tokenise); it is
    thread-safe and may run in a worker thread for batch k+1 while ``forward`` runs batch k.
    ``embed_batch(items) == forward(preprocess(items))``, chunked by ``batch_size``.
    """

    def __init__(self, spec: EncoderSpec, *, batch_size: int = 32) -> None:
        super().__init__(spec)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    @abstractmethod
    def preprocess(self, items: Sequence[Any]) -> Any:
        """CPU-side preparation of one batch; the result is only meant for ``forward``."""

    @abstractmethod
    def forward(self, batch: Any) -> Vectors:
        """Run the model on a prepared batch; float32 (n, dim), L2-normalised rows."""

    def embed_batch(self, items: Sequence[Image.Image] | Sequence[str]) -> Vectors:
        self.load()
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = [
            self.forward(self.preprocess(items[start : start + self.batch_size]))
            for start in range(0, len(items), self.batch_size)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class ImageEncoder(StagedEncoder):
    """A staged encoder of images.

    ``min_side`` is the shortest side, in pixels, that preprocessing resizes to: decode with
    ``decode_image(..., draft_size=encoder.min_side)`` (the largest over all image encoders
    fed from one decode) and nothing is lost.
    """

    modality: ClassVar[str] = "image"
    min_side: int = 224

    @abstractmethod
    def preprocess(self, items: Sequence[Image.Image]) -> Any:
        """Resize / crop a batch of PIL images (any mode) into what ``forward`` takes."""


def l2_normalise(x: NDArray[np.floating]) -> Vectors:
    """Row-wise L2 normalisation to float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
