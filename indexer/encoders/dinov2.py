"""DINOv2 through timm: the ``visual`` space ("looks like").

Torch and timm are imported in ``_load`` only, so importing this module stays light.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from indexer.encoders._hub import ModelSource, hub_errors, model_not_found, resolve_source
from indexer.encoders._identity import settle_spec
from indexer.encoders._imaging import RESAMPLE, crops_u8
from indexer.encoders.base import EncoderSpec, ImageEncoder, Vectors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DINOV2_IMAGE_SIZE = 224
"""DINOv2's evaluation resolution: resize the short side to 256, centre-crop 224."""
DINOV2_CROP_PCT = 0.875


class DinoV2Encoder(ImageEncoder):
    """DINOv2 ViT image embedding: the CLS token after the final norm, L2-normalised.

    ``spec.model`` is a timm name (``vit_small_patch14_dinov2.lvd142m``: weights from the hub
    repo timm registers for it), ``hf-hub:org/repo``, ``org/repo``, or a local directory laid
    out as timm's ``save_for_hf`` writes it (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``), optionally prefixed ``local-dir:``.

    ``image_size``: the square crop the model runs at. 224 (default) follows DINOv2's own
    evaluation transform (resize 256, centre-crop 224) and resamples the position embeddings
    once at load; ``None`` keeps the checkpoint's recorded input size and crop fraction.
    Mean / std / interpolation always come from the checkpoint's timm data config.

    ``preprocess(images)`` -> uint8 (n, S, S, 3); ``forward(batch)`` -> float32 (n, dim).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        device: str | None = None,
        dtype: str = "fp32",
        batch_size: int = 32,
        image_size: int | None = DINOV2_IMAGE_SIZE,
    ) -> None:
        super().__init__(spec, batch_size=batch_size)
        self._device_name = device
        self._dtype_name = dtype
        self._image_size = image_size
        self.min_side = (
            math.floor(image_size / DINOV2_CROP_PCT) if image_size else DINOV2_IMAGE_SIZE
        )
        self._model: Any = None
        self._crop = DINOV2_IMAGE_SIZE
        self._resample = Image.Resampling.BICUBIC
        self._mean: tuple[float, ...] = (0.485, 0.456, 0.406)
        self._std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def _load(self) -> None:
        import timm

        from indexer.encoders import _torch

        self.device = _torch.resolve_device(self._device_name)
        self.torch_dtype = _torch.resolve_dtype(self._dtype_name, self.device)
        if self.device.type == "cpu":
            _torch.configure_cpu_threads()

        timm_name, source, download_id = self._timm_source()
        # a local checkpoint's recorded architecture args (depth, width, ...): timm releases
        # before 1.0.31 do not apply them for local-dir sources themselves
        kwargs: dict[str, Any] = _recorded_model_args(source.local) if source.local else {}
        kwargs.update(num_classes=0, global_pool="token")
        if self._image_size:
            kwargs["img_size"] = self._image_size
        try:
            model: Any = timm.create_model(timm_name, pretrained=True, **kwargs)
        except hub_errors(source) as exc:
            raise self._not_found(source, exc, download_id) from exc
        except RuntimeError as exc:
            if "Unknown model" not in str(exc) and "Invalid pretrained tag" not in str(exc):
                raise
            raise self._not_found(source, exc, download_id) from exc

        config = timm.data.resolve_model_data_config(model)
        self._mean = tuple(float(v) for v in config["mean"])
        self._std = tuple(float(v) for v in config["std"])
        self._resample = RESAMPLE.get(str(config.get("interpolation")), Image.Resampling.BICUBIC)
        if self._image_size:
            self._crop = self._image_size
            crop_pct = DINOV2_CROP_PCT
        else:
            # the size the model was built for; older timm leave the data config at 518
            built = getattr(getattr(model, "patch_embed", None), "img_size", None)
            self._crop = int(built[-1]) if built else int(config["input_size"][-1])
            crop_pct = float(config.get("crop_pct") or 1.0)
        self.min_side = math.floor(self._crop / crop_pct)

        self._model = model.eval().to(self.device, self.torch_dtype)
        self.spec = settle_spec(self.spec, int(model.num_features))
        log.info(
            "dinov2 %s loaded (dim %d, %dpx, %s, %s)",
            self.spec.model,
            self.spec.dim,
            self._crop,
            self.device,
            self.torch_dtype,
        )

    def _timm_source(self) -> tuple[str, ModelSource, str | None]:
        """(name for ``timm.create_model``, where it was looked for, hub repo to download)."""
        name = self.spec.model
        if name.startswith("local-dir:"):
            path = Path(name.partition(":")[2]).expanduser()
            if not path.is_dir():
                raise self._not_found(ModelSource(name, tried_local=path.absolute()), None, None)
            return "local-dir:" + str(path.resolve()), ModelSource(name, local=path.resolve()), None
        if name.startswith(("hf-hub:", "hf_hub:")):
            repo = name.partition(":")[2]
            return "hf-hub:" + repo, ModelSource(name, hub_id=repo), repo
        source = resolve_source(name)
        if source.local is not None:
            return "local-dir:" + str(source.local), source, None
        if source.hub_id is None:
            raise self._not_found(source, None, None)
        if "/" in name:
            return "hf-hub:" + name, source, name
        import timm

        if not timm.is_model(name):
            note = (
                f"{name!r} is not a timm model name (see timm.list_models('*dinov2*')), "
                "a hub id (org/name) or a local directory."
            )
            unknown = ModelSource(name, tried_local=source.tried_local)
            raise self._not_found(unknown, None, None, note)
        return name, source, _registered_hub_id(name)

    def _not_found(
        self,
        source: ModelSource,
        cause: BaseException | None,
        download_id: str | None,
        note: str | None = None,
    ) -> Exception:
        return model_not_found(
            family="dinov2",
            space=self.space,
            source=source,
            cause=cause,
            download_id=download_id,
            note=note,
        )

    def preprocess(self, items: Sequence[Image.Image]) -> NDArray[np.uint8]:
        """PIL images (any mode/size) -> uint8 (n, S, S, 3): short side to min_side, centre crop."""
        self.load()
        return crops_u8(items, self.min_side, self._crop, self._resample)

    def forward(self, batch: NDArray[np.uint8]) -> Vectors:
        """uint8 (n, S, S, 3) crops -> float32 (n, dim) CLS embeddings, L2-normalised."""
        import torch

        from indexer.encoders import _torch

        self.load()
        with torch.inference_mode():
            x = _torch.normalised_pixels(
                batch, self._mean, self._std, self.device, self.torch_dtype
            )
            features: torch.Tensor = self._model(x)
        return _torch.to_vectors(features)


def _recorded_model_args(directory: Path) -> dict[str, Any]:
    """``model_args`` from a timm ``config.json`` (empty when absent or unreadable)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # timm itself reports the missing / broken config
    args = config.get("model_args") if isinstance(config, dict) else None
    return dict(args) if isinstance(args, dict) else {}


def _registered_hub_id(name: str) -> str | None:
    """The hub repo timm downloads a registered model's weights from (``timm/<name>``)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        return None
    return cfg.hf_hub_id if cfg is not None else None
