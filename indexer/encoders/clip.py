"""CLIP through transformers: the ``clip`` space, where images and texts meet.

Torch and transformers are imported in ``_load`` only, so importing this module stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from indexer.encoders._hub import ModelSource, hub_errors, model_not_found, resolve_source
from indexer.encoders._identity import settle_spec
from indexer.encoders._imaging import as_rgb, crops_u8
from indexer.encoders.base import EncoderSpec, ImageEncoder, Vectors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class ClipEncoder(ImageEncoder):
    """CLIP image tower (``embed_batch``) and text tower (``embed_texts``), one shared space.

    ``spec.model`` is a hub id (``openai/clip-vit-base-patch32``) or a local directory as
    ``save_pretrained`` writes it (config, weights, tokenizer files, preprocessor_config.json).
    Preprocessing follows the checkpoint's image processor config (short side resize,
    centre crop, CLIP mean / std), done with PIL on uint8 so it can run in a worker thread.

    ``preprocess(images)`` -> uint8 (n, S, S, 3); ``forward(batch)`` -> float32 (n, dim);
    ``embed_texts(texts)`` -> float32 (n, dim). All rows L2-normalised.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int = 32,
    ) -> None:
        super().__init__(spec, batch_size=batch_size)
        self._device_name = device
        self._dtype_name = dtype
        self._model: Any = None
        self._tokenizer: Any = None
        self._crop = 224
        self._squash: tuple[int, int] | None = None
        self._resample = Image.Resampling.BICUBIC
        self._mean: tuple[float, ...] = ()
        self._std: tuple[float, ...] = ()
        self._max_tokens = 77

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from indexer.encoders import _torch

        self.device = _torch.resolve_device(self._device_name)
        self.torch_dtype = _torch.resolve_dtype(self._dtype_name, self.device)
        if self.device.type == "cpu":
            _torch.configure_cpu_threads()

        source = resolve_source(self.spec.model)
        where = str(source.local) if source.local is not None else source.hub_id
        if where is None:
            raise self._not_found(source, None)
        try:
            model: Any = CLIPModel.from_pretrained(where)
            processor = CLIPImageProcessor.from_pretrained(where)
            tokenizer = AutoTokenizer.from_pretrained(where)
        except hub_errors(source) as exc:
            raise self._not_found(source, exc) from exc

        self._configure_preprocessing(processor)
        self._tokenizer = tokenizer
        self._max_tokens = int(model.config.text_config.max_position_embeddings)
        self._model = model.eval().to(self.device, self.torch_dtype)
        self.spec = settle_spec(self.spec, int(model.config.projection_dim))
        log.info(
            "clip %s loaded (dim %d, %s, %s)",
            self.spec.model,
            self.dim,
            self.device,
            self.torch_dtype,
        )

    def _configure_preprocessing(self, processor: Any) -> None:
        size, crop = processor.size, processor.crop_size
        shortest = _field(size, "shortest_edge")
        if shortest is not None:
            self.min_side = int(shortest)
        else:  # a fixed (height, width) resize, then the crop
            height, width = int(_field(size, "height")), int(_field(size, "width"))
            self._squash = (width, height)
            self.min_side = min(height, width)
        self._crop = (
            int(_field(crop, "height")) if getattr(processor, "do_center_crop", True) else 0
        ) or self.min_side
        self._resample = Image.Resampling(int(processor.resample))
        self._mean = tuple(float(v) for v in processor.image_mean)
        self._std = tuple(float(v) for v in processor.image_std)

    def _not_found(self, source: ModelSource, cause: BaseException | None) -> Exception:
        return model_not_found(family="clip", space=self.space, source=source, cause=cause)

    def preprocess(self, items: Sequence[Image.Image]) -> NDArray[np.uint8]:
        """PIL images (any mode/size) -> uint8 (n, S, S, 3), sized as the checkpoint's processor."""
        self.load()
        if self._squash is not None:
            items = [as_rgb(image).resize(self._squash, self._resample) for image in items]
        return crops_u8(items, self.min_side, self._crop, self._resample)

    def forward(self, batch: NDArray[np.uint8]) -> Vectors:
        """uint8 (n, S, S, 3) crops -> float32 (n, dim) image embeddings, L2-normalised."""
        import torch

        from indexer.encoders import _torch

        self.load()
        with torch.inference_mode():
            x = _torch.normalised_pixels(
                batch, self._mean, self._std, self.device, self.torch_dtype
            )
            pooled = self._model.vision_model(pixel_values=x).pooler_output
            features: torch.Tensor = self._model.visual_projection(pooled)
        return _torch.to_vectors(features)

    def embed_texts(self, texts: Sequence[str]) -> Vectors:
        """Texts -> float32 (n, dim) CLIP text embeddings, L2-normalised, in the image space.

        Texts longer than the model's context (77 tokens for OpenAI CLIP) are truncated.
        """
        import torch

        from indexer.encoders import _torch

        self.load()
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self._max_tokens,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                pooled = self._model.text_model(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                ).pooler_output
                out.append(_torch.to_vectors(self._model.text_projection(pooled)))
        return out[0] if len(out) == 1 else np.concatenate(out)


def _field(size: Any, key: str) -> Any:
    """A key of transformers' size dicts (a plain dict or a ``SizeDict``), or None."""
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)
