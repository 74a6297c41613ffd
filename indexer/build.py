"""Choosing the encoders for a catalog: from a profile for a new one, from its manifest after."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from indexer.catalog import MANIFEST, Catalog
from indexer.encoders import Encoder, EncoderSpec, create_encoder, profile_specs, resolve_spec
from indexer.vector_index import IndexPolicy
from indexer.vector_store import StoreConfig

log = logging.getLogger(__name__)

DEFAULT_PROFILE = "default"


def recorded_specs(catalog_path: Path) -> dict[str, EncoderSpec] | None:
    """The encoder specs a catalog's manifest records, or None when there is no catalog yet."""
    manifest_path = catalog_path / MANIFEST
    if not manifest_path.exists():
        return None
    manifest: dict[str, Any] = Catalog.read_manifest(catalog_path)
    return {
        space: EncoderSpec(
            name=entry["name"],
            family=entry["family"],
            space=space,
            model=entry["model"],
            dim=int(entry["dim"]),
            revision=entry["revision"],
        )
        for space, entry in manifest["encoders"].items()
    }


def choose_specs(
    catalog_path: Path, profile: str | None, overrides: Mapping[str, str]
) -> dict[str, EncoderSpec]:
    """Specs for indexing into ``catalog_path``.

    An existing catalog keeps the encoders it was built with unless a profile or model is
    named (then Catalog.open refuses a mismatch clearly); a new one uses the profile,
    ``default`` if none.
    """
    recorded = recorded_specs(catalog_path)
    if recorded is not None and profile is None and not overrides:
        return recorded
    specs = profile_specs(profile or DEFAULT_PROFILE, dict(overrides))
    return {space: resolve_spec(spec) for space, spec in specs.items()}


def create_encoders(
    specs: Mapping[str, EncoderSpec], device: str | None, dtype: str
) -> dict[str, Encoder]:
    return {
        space: create_encoder(spec, device=device, dtype=dtype) for space, spec in specs.items()
    }


def open_for_indexing(
    catalog_path: Path,
    *,
    profile: str | None,
    overrides: Mapping[str, str],
    device: str | None,
    dtype: str,
    store: StoreConfig | None = None,
    policy: IndexPolicy | None = None,
) -> tuple[Catalog, dict[str, Encoder]]:
    """Open (or create) the catalog and the encoders that fill it, checking they match.

    ``store`` is the vector store of a new catalog (an existing one keeps its own)."""
    specs = choose_specs(catalog_path, profile, overrides)
    encoders = create_encoders(specs, device, dtype)
    if recorded_specs(catalog_path) is None:
        # A new catalog records what the loaded models really are (revision, dim), so the
        # first run fetches and loads them before the manifest is written.
        for encoder in encoders.values():
            encoder.load()
        specs = {space: encoder.spec for space, encoder in encoders.items()}
    return Catalog.create_or_open(catalog_path, specs, policy, store), encoders
