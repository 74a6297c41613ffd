"""Where a model comes from (local directory or Hugging Face hub), its revision, and the
one error raised when it cannot be found. No torch here: only the standard library and,
lazily, ``huggingface_hub``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from indexer.errors import ModelNotFoundError

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed from each end of a weight file


@dataclass(frozen=True)
class ModelSource:
    """A model name resolved to a place: ``local`` is an existing directory, else ``hub_id``."""

    requested: str
    local: Path | None = None
    hub_id: str | None = None
    tried_local: Path | None = None


def looks_like_path(name: str) -> bool:
    """True for names that can only be filesystem paths (hub ids are ``name`` or ``org/name``)."""
    return (
        name.startswith((".", "~", os.sep))
        or (os.altsep is not None and os.altsep in name)
        or name.count("/") > 1
        or name.endswith("/")
    )


def resolve_source(name: str) -> ModelSource:
    """An existing directory wins; a missing path-like name stays local (and fails later)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource(name, local=path.resolve(), tried_local=path.resolve())
    tried = path.absolute()
    if looks_like_path(name):
        return ModelSource(name, tried_local=tried)
    return ModelSource(name, hub_id=name, tried_local=tried)


def local_fingerprint(directory: Path) -> str:
    """Short content fingerprint of a local checkpoint: ``local-`` + 12 hex digits.

    Hashes every ``*.json`` config at the top of the directory and, for each weight file, its
    name, size and first and last MiB: cheap even for large checkpoints, and it changes when
    fine-tuned weights replace the originals under an identical config.
    """
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json":
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        elif path.suffix in _WEIGHT_SUFFIXES:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as fh:
                digest.update(fh.read(_FINGERPRINT_SAMPLE))
                if size > _FINGERPRINT_SAMPLE:
                    fh.seek(max(size - _FINGERPRINT_SAMPLE, _FINGERPRINT_SAMPLE))
                    digest.update(fh.read())
    return "local-" + digest.hexdigest()[:12]


def hub_revision(repo_id: str, filename: str = "config.json") -> str:
    """The commit hash of ``repo_id`` in the local hub cache, or ``"main"`` when unknown."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, filename)
    except Exception:  # the revision is informative; never fail a load over it
        log.debug("could not look up the cached revision of %s", repo_id, exc_info=True)
        return "main"
    if isinstance(cached, str):
        parts = Path(cached).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return "main"


def hub_errors(source: ModelSource | None = None) -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the files are not there" (hub, cache or disk), not a bug.

    For an existing local directory a ``ValueError`` counts too: the loaders raise it for a
    directory without a usable config (e.g. "Unrecognized model").
    """
    errors: list[type[BaseException]] = [OSError]
    if source is not None and source.local is not None:
        errors.append(ValueError)
    try:
        from huggingface_hub import errors as hf_errors

        errors.append(hf_errors.EntryNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    return tuple(errors)


def _hub_state() -> tuple[str, bool]:
    """(hub cache directory, whether the hub is offline) as huggingface_hub sees them."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE), bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return "~/.cache/huggingface/hub", False


def model_not_found(
    *,
    family: str,
    space: str,
    source: ModelSource,
    cause: BaseException | None = None,
    download_id: str | None = None,
    note: str | None = None,
) -> ModelNotFoundError:
    """Build the one clear error: which model, where it was looked for, how to provide it."""
    lines = [f"Cannot load the {family} model {source.requested!r} for the {space!r} space."]
    if note:
        lines.append(note)
    lines.append("Looked for it in:")
    if source.local is not None:
        lines.append(f"  - local directory {source.local} (exists, but could not be loaded)")
    elif source.tried_local is not None:
        lines.append(f"  - local directory {source.tried_local} (does not exist)")
    repo = download_id or source.hub_id
    if repo is not None and source.local is None:
        cache, offline = _hub_state()
        lines.append(f"  - Hugging Face hub cache {cache} ({repo!r} is not cached there)")
        if offline:
            lines.append("  - Hugging Face hub: not contacted, HF_HUB_OFFLINE is set")
        else:
            lines.append("  - Hugging Face hub: download failed (no network, or no such repo?)")
    if cause is not None:
        lines.append(f"Underlying error: {type(cause).__name__}: {_first_line(cause)}")
    lines.append("To provide it:")
    lines.append(
        f"  - point the {space!r} space's model option at a local directory holding the model "
        "files (config + weights), or"
    )
    if repo is not None:
        lines.append(
            f"  - on a machine with internet run `hf download {repo}` (older huggingface_hub: "
            f"`huggingface-cli download {repo}`), copy the hub cache here (HF_HOME), and set "
            "HF_HUB_OFFLINE=1, or"
        )
    lines.append(
        "  - use `--profile offline`, which needs no download (weight-free `pixels` visual "
        "descriptor + the bundled all-MiniLM-L6-v2 text model; no `clip` space)."
    )
    return ModelNotFoundError("\n".join(lines))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
