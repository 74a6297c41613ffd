"""Embedding models: a registry of frozen specs, one module per family, lazy heavy imports.

Importing this package imports no torch; a torch family imports its framework in ``load()``.
"""

from indexer.encoders._identity import resolve_spec
from indexer.encoders.base import (
    SPACES,
    Encoder,
    EncoderSpec,
    ImageEncoder,
    StagedEncoder,
    Vectors,
    l2_normalise,
)
from indexer.encoders.clip import ClipEncoder
from indexer.encoders.dinov2 import DinoV2Encoder
from indexer.encoders.pixels import PIXELS_DIM, PIXELS_VERSION, PixelsEncoder
from indexer.encoders.registry import (
    DTYPES,
    ENCODER_SPECS,
    FAMILIES,
    PROFILES,
    create_encoder,
    get_spec,
    profile_specs,
)
from indexer.encoders.text import SentenceTransformerEncoder

__all__ = [
    "DTYPES",
    "ENCODER_SPECS",
    "FAMILIES",
    "PIXELS_DIM",
    "PIXELS_VERSION",
    "PROFILES",
    "SPACES",
    "ClipEncoder",
    "DinoV2Encoder",
    "Encoder",
    "EncoderSpec",
    "ImageEncoder",
    "PixelsEncoder",
    "SentenceTransformerEncoder",
    "StagedEncoder",
    "Vectors",
    "create_encoder",
    "get_spec",
    "l2_normalise",
    "profile_specs",
    "resolve_spec",
]
