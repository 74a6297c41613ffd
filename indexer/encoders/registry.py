"""The registry: frozen encoder specs, the profiles that group them, and one factory.

Importing this module imports no torch: the family classes import their frameworks in
``load()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from indexer.encoders.base import SPACES, Encoder, EncoderSpec
from indexer.encoders.clip import ClipEncoder
from indexer.encoders.dinov2 import DinoV2Encoder
from indexer.encoders.pixels import PIXELS_DIM, PIXELS_VERSION, PixelsEncoder
from indexer.encoders.text import SentenceTransformerEncoder
from indexer.errors import UnknownEncoderError

DTYPES = ("fp32", "bf16", "auto")

ENCODER_SPECS: Mapping[str, EncoderSpec] = MappingProxyType(
    {
        "dinov2": EncoderSpec(
            name="dinov2",
            family="dinov2",
            space="visual",
            model="vit_small_patch14_dinov2.lvd142m",
            dim=384,
            description="DINOv2 ViT-S/14 CLS embedding via timm, 224 px: 'looks like'.",
        ),
        "clip": EncoderSpec(
            name="clip",
            family="clip",
            space="clip",
            model="openai/clip-vit-base-patch32",
            dim=512,
            description="CLIP ViT-B/32 via transformers: images and texts in one space.",
        ),
        "text": EncoderSpec(
            name="text",
            family="text",
            space="text",
            model="all-MiniLM-L6-v2",
            dim=384,
            description="all-MiniLM-L6-v2 via sentence-transformers: prompts and tags.",
        ),
        "pixels": EncoderSpec(
            name="pixels",
            family="pixels",
            space="visual",
            model="pixels",
            dim=PIXELS_DIM,
            revision=PIXELS_VERSION,
            description=(
                "Weight-free fallback: colour, layout and edge histograms. Finds similar "
                "palettes and compositions, not similar content; use DINOv2 when possible."
            ),
        ),
    }
)

FAMILIES: Mapping[str, Callable[..., Encoder]] = MappingProxyType(
    {
        "dinov2": DinoV2Encoder,
        "clip": ClipEncoder,
        "text": SentenceTransformerEncoder,
        "pixels": PixelsEncoder,
    }
)

PROFILES: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "default": MappingProxyType({"visual": "dinov2", "clip": "clip", "text": "text"}),
        "offline": MappingProxyType({"visual": "pixels", "text": "text"}),
    }
)
"""Profile name -> {space: encoder name}. ``offline`` needs no download and has no ``clip``."""

SPACE_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {"visual": "dinov2", "clip": "clip", "text": "text"}
)
"""The encoder a space gets when an override names a model for a space its profile lacks."""


def get_spec(name: str) -> EncoderSpec:
    """The registered spec called ``name``; ``UnknownEncoderError`` lists the valid names."""
    try:
        return ENCODER_SPECS[name]
    except KeyError:
        valid = ", ".join(sorted(ENCODER_SPECS))
        raise UnknownEncoderError(f"unknown encoder {name!r}; valid encoders: {valid}") from None


def create_encoder(
    spec_or_name: EncoderSpec | str,
    *,
    model: str | None = None,
    device: str | None = None,
    dtype: str = "fp32",
    batch_size: int | None = None,
) -> Encoder:
    """Build (not load) an encoder. Nothing heavy happens until ``encoder.load()``.

    ``model``: a hub id or local directory replacing the spec's default checkpoint.
    ``device``: ``None``/``"auto"`` picks CUDA when available, else CPU. ``dtype``: ``fp32``,
    ``bf16`` (weights and activations), or ``auto`` (bf16 where the hardware has it: a
    bf16-capable GPU or an AMX CPU; else fp32). Vectors always come back float32,
    L2-normalised.
    ``batch_size``: rows per forward pass (family default when ``None``).
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    family = FAMILIES.get(spec.family)
    if family is None:
        valid = ", ".join(sorted(FAMILIES))
        raise UnknownEncoderError(f"unknown encoder family {spec.family!r}; valid: {valid}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if model is not None and model != spec.model:
        if family is PixelsEncoder:
            raise ValueError("the pixels encoder has no weights: it takes no model")
        spec = replace(spec, model=model, revision="main")
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    return family(spec, **kwargs)


def profile_specs(
    profile: str, overrides: Mapping[str, str] | None = None
) -> dict[str, EncoderSpec]:
    """{space: spec} for a profile, with per-space overrides.

    An override value is either a registered encoder name of that space (``{"visual":
    "pixels"}``) or a model (hub id or local directory) for the space's encoder
    (``{"clip": "/models/clip"}``); a space the profile lacks gets its default family.
    """
    try:
        names = PROFILES[profile]
    except KeyError:
        valid = ", ".join(sorted(PROFILES))
        raise UnknownEncoderError(f"unknown profile {profile!r}; valid profiles: {valid}") from None
    specs = {space: get_spec(name) for space, name in names.items()}
    for space, value in (overrides or {}).items():
        if space not in SPACES:
            raise UnknownEncoderError(f"unknown space {space!r}; valid spaces: {', '.join(SPACES)}")
        named = ENCODER_SPECS.get(value)
        if named is not None:
            if named.space != space:
                raise UnknownEncoderError(
                    f"encoder {value!r} embeds the {named.space!r} space, not {space!r}"
                )
            specs[space] = named
            continue
        base = specs.get(space) or get_spec(SPACE_DEFAULTS[space])
        if base.family == "pixels":
            base = get_spec(SPACE_DEFAULTS[space])
        specs[space] = replace(base, model=value, revision="main")
    return specs
