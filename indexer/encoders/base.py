"""The one small interface every encoder implements, and the frozen spec that describes it."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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
    ``embed_batch`` calls it when needed.
    """

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


def l2_normalise(x: NDArray[np.floating]) -> Vectors:
    """Row-wise L2 normalisation to float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
