"""Weight-free stand-in encoders for tests that exercise the catalog, pipeline and engine."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from indexer.encoders.base import Encoder, EncoderSpec, Vectors, l2_normalise


class MeanColourEncoder(Encoder):
    """A weight-free stand-in: mean and spread of each channel on a 2x2 grid."""

    def __init__(self) -> None:
        super().__init__(EncoderSpec("fake-colour", "fake", "visual", "fake", 24, "v1"))

    def _load(self) -> None:
        pass

    def embed_batch(self, items: Sequence[Image.Image] | Sequence[str]) -> Vectors:
        rows = []
        for image in items:
            assert isinstance(image, Image.Image)
            a = np.asarray(image.resize((32, 32)), dtype=np.float32) / 255.0
            cells = [a[i : i + 16, j : j + 16] for i in (0, 16) for j in (0, 16)]
            rows.append(np.concatenate([[c.mean((0, 1)), c.std((0, 1))] for c in cells]).ravel())
        return l2_normalise(np.array(rows))


class HashTextEncoder(Encoder):
    """A weight-free stand-in text encoder: hashed bag of words."""

    def __init__(self) -> None:
        super().__init__(EncoderSpec("fake-text", "fake", "text", "fake", 32, "v1"))

    def _load(self) -> None:
        pass

    def embed_batch(self, items: Sequence[Image.Image] | Sequence[str]) -> Vectors:
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        for i, text in enumerate(items):
            for word in str(text).lower().split():
                out[i, sum(map(ord, word)) % self.dim] += 1.0
        return l2_normalise(out)


def fake_encoders() -> dict[str, Encoder]:
    return {"visual": MeanColourEncoder(), "text": HashTextEncoder()}


def specs() -> dict[str, EncoderSpec]:
    return {space: enc.spec for space, enc in fake_encoders().items()}
