"""Image generation with diffusers: SDXL (+ IP-Adapter) or Kandinsky 2.2, conditioned on where
a session is heading in image-embedding space.

Two pipeline kinds:

* ``sdxl``: any SDXL checkpoint (SDXL-Turbo by default). The prompt conditions through the text
  encoders; the image embedding through an IP-Adapter fed ``ip_adapter_image_embeds``.
* ``kandinsky``: the Kandinsky 2.2 decoder, whose only condition is a CLIP image embedding;
  an optional prior turns the prompt into one, blended with the session's embedding.

The conditioning embedding is the catalog's CLIP vector when its dimension is the one the
pipeline expects, else the rank-weighted mean of the reference images as the pipeline's own
CLIP vision tower embeds them. Torch, transformers and diffusers are imported in ``load`` only,
so importing this module stays light.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from indexer.errors import ImageRejected, ModelNotFoundError
from indexer.images import decode_image
from recommender.generation_types import GeneratedImage, GenerationRequest

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KINDS: Final = ("auto", "sdxl", "kandinsky")
DTYPES: Final = ("auto", "fp32", "fp16", "bf16")

# Reference images embedded per request, best first; the tail adds little and costs encoder time.
MAX_REFERENCE_IMAGES: Final = 8
# The prior's own defaults (kandinsky-2-2-prior model card); not worth a setting each.
PRIOR_STEPS: Final = 25
PRIOR_GUIDANCE: Final = 4.0


@dataclass(frozen=True)
class _KindDefaults:
    model: str
    steps: int
    guidance_scale: float
    encoder_subfolder: str


_KIND_DEFAULTS: Final = {
    # SDXL-Turbo is distilled for 1-4 steps without classifier-free guidance (its model card).
    "sdxl": _KindDefaults("stabilityai/sdxl-turbo", 4, 0.0, "models/image_encoder"),
    # The decoder's DDPM scheduler needs many steps; 4.0 is the pipeline's own guidance default.
    "kandinsky": _KindDefaults(
        "kandinsky-community/kandinsky-2-2-decoder", 50, 4.0, "image_encoder"
    ),
}

# (hidden_size, layers) of a CLIP vision tower -> its usual name, for conditioning summaries.
_VIT_NAMES: Final = {
    (768, 12): "ViT-B",
    (1024, 24): "ViT-L",
    (1280, 32): "ViT-H",
    (1408, 40): "ViT-g",
    (1664, 48): "ViT-bigG",
}


@dataclass(frozen=True)
class DiffusersConfig:
    """How the diffusers backend builds its pipeline; each field is one ``LOOKALIKE_GENERATOR_*``
    setting (``generator_model`` -> ``model``, ...). Model fields take a hub id or a local
    directory as ``save_pretrained`` writes it."""

    model: str | None = None
    """Pipeline to load; None: ``stabilityai/sdxl-turbo`` (sdxl, auto) or
    ``kandinsky-community/kandinsky-2-2-decoder`` (kandinsky)."""
    kind: str = "auto"
    """``sdxl``, ``kandinsky``, or ``auto``: read from the model's ``model_index.json``."""
    ip_adapter: str | None = "h94/IP-Adapter"
    """sdxl: repo or directory of the IP-Adapter weights; None: the prompt alone conditions."""
    ip_adapter_subfolder: str = "sdxl_models"
    """sdxl: subfolder of ``ip_adapter`` holding the weight file."""
    ip_adapter_weight: str = "ip-adapter_sdxl_vit-h.safetensors"
    """sdxl: weight file name; a plain (not Plus / FaceID) IP-Adapter, fed pooled embeddings."""
    image_encoder: str | None = "h94/IP-Adapter"
    """CLIP vision tower that embeds reference images. sdxl: the one the IP-Adapter was trained
    with. kandinsky: used without a prior, and only if its projection dim is the decoder's
    (``kandinsky-community/kandinsky-2-2-prior``); with a prior, the prior's own encoder is
    used. None: reference images are not embedded."""
    image_encoder_subfolder: str | None = None
    """Subfolder of ``image_encoder`` ("" for none); None: the kind's layout,
    ``models/image_encoder`` (IP-Adapter repo, sdxl) or ``image_encoder`` (prior repo,
    kandinsky)."""
    ip_adapter_scale: float = 0.6
    """sdxl: weight of the image embedding against the prompt (0: prompt only, 1: image only)."""
    prior: str | None = None
    """kandinsky: prior turning the prompt into an image embedding
    (``kandinsky-community/kandinsky-2-2-prior``); None: the image embedding alone conditions."""
    prior_weight: float = 0.5
    """kandinsky with a prior: weight of the prompt's embedding in the blend; the session's
    image embedding gets ``1 - prior_weight``."""
    steps: int | None = None
    """Denoising steps; None: the kind's default (sdxl-turbo 4, kandinsky 50). A base SDXL
    checkpoint wants about 30."""
    guidance_scale: float | None = None
    """Classifier-free guidance; None: the kind's default (sdxl-turbo 0.0, kandinsky 4.0);
    at most 1.0 turns guidance (and the negative prompt) off."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU) or a torch device name."""
    dtype: str = "auto"
    """``fp32``, ``fp16``, ``bf16``, or ``auto``: fp16 on CUDA, fp32 elsewhere."""
    negative_prompt: str | None = None
    """Negative prompt when a request brings none (used only with guidance above 1)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"generator kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"generator dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}"
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"generator steps must be >= 1; got {self.steps}")
        if not 0.0 <= self.prior_weight <= 1.0:
            raise ValueError(f"prior_weight must be within [0, 1]; got {self.prior_weight}")
        if self.ip_adapter_scale < 0.0:
            raise ValueError(f"ip_adapter_scale must be >= 0; got {self.ip_adapter_scale}")


@dataclass(frozen=True)
class _Condition:
    """An image embedding for the pipeline: float32 (dim,), at the scale its encoder outputs,
    and a one-line account of where it came from."""

    embeds: NDArray[np.float32]
    source: str


class DiffusersBackend:
    """``ImageBackend`` over a diffusers pipeline (see the module docstring for the two kinds).

    ``load`` is lock-guarded and idempotent; ``generate`` calls it when needed. Image ``i`` of
    a request is drawn from seed ``request.seed + i`` (recorded in its ``seed``), so each image
    can be remade alone. Returned images have exactly the requested size: the pipeline runs at
    the nearest size it supports and the result is resized when that differs.
    """

    name = "diffusers"

    def __init__(self, config: DiffusersConfig | None = None) -> None:
        self.config = config or DiffusersConfig()
        self._lock = threading.Lock()
        self._loaded = False
        self._kind: str | None = None
        self._device: Any = None
        self._dtype: Any = None
        self._pipe: Any = None
        self._prior: Any = None
        self._encoder: Any = None
        self._processor: Any = None
        self._encoder_label = ""
        self._embed_dim: int | None = None
        self._negative: NDArray[np.float32] | None = None
        self._size_multiple = 8

    def __reduce__(self) -> tuple[Any, ...]:
        # The generation queue hands the backend to a child process: send the config only,
        # the child loads its own pipeline.
        return (DiffusersBackend, (self.config,))

    @property
    def kind(self) -> str | None:
        """``sdxl`` or ``kandinsky`` once loaded (``auto`` resolved), else None."""
        return self._kind

    @property
    def model_id(self) -> str:
        """The pipeline's hub id or local path (the kind's default when none was configured)."""
        kind = self._kind or (self.config.kind if self.config.kind != "auto" else "sdxl")
        return self.config.model or _KIND_DEFAULTS[kind].model

    @property
    def embed_dim(self) -> int | None:
        """Image-embedding dimension the pipeline is conditioned with (IP-Adapter projection
        input or Kandinsky decoder ``encoder_hid_dim``); None before loading or without an
        IP-Adapter."""
        return self._embed_dim

    def load(self) -> None:
        """Load the pipeline (and IP-Adapter, prior, vision encoder) onto the device; once.

        Raises ``ModelNotFoundError`` naming the model when weights are neither local nor
        downloadable, ``ImportError`` when diffusers is not installed.
        """
        with self._lock:
            if self._loaded:
                return
            started = time.perf_counter()
            self._load()
            self._loaded = True
            log.info(
                "diffusers %s %s loaded on %s (%s) in %.1f s; image embedding: %s",
                self._kind,
                self.model_id,
                self._device,
                str(self._dtype).removeprefix("torch."),
                time.perf_counter() - started,
                f"{self._embed_dim}-d" if self._embed_dim else "none",
            )

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]:
        """``request.count`` images of ``request.width`` x ``request.height`` (RGB PIL), each
        with a JSON-able ``conditioning`` summary (embedding source, steps, guidance, scale).

        Raises ``ValueError`` for a Kandinsky decoder without a prior when neither the
        catalog embedding fits nor a reference image can be embedded.
        """
        if request.count < 1:
            return []
        self.load()
        import torch

        steps, guidance = self._steps_and_guidance()
        width = _round_to(request.width, self._size_multiple)
        height = _round_to(request.height, self._size_multiple)
        # One CPU generator per image: the same draws on any device, each image remakeable.
        generators = [
            torch.Generator(device="cpu").manual_seed(request.seed + i)
            for i in range(request.count)
        ]
        summary: dict[str, Any] = {"steps": steps, "guidance_scale": guidance}
        if (width, height) != (request.width, request.height):
            summary["generated_size"] = [width, height]
        if self._kind == "sdxl":
            images = self._generate_sdxl(request, width, height, generators, summary)
        else:
            images = self._generate_kandinsky(request, width, height, generators, summary)
        return [
            GeneratedImage(
                image=_fit(image, request.width, request.height),
                prompt=request.prompt,
                seed=request.seed + i,
                backend=self.name,
                model=self.model_id,
                conditioning=dict(summary),
            )
            for i, image in enumerate(images)
        ]

    # --- loading ----------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            import diffusers  # noqa: F401
            import torch
        except ImportError as exc:
            raise ImportError(
                "the diffusers generator needs diffusers: pip install 'lookalike[diffusers]'"
            ) from exc
        self._device = _resolve_device(self.config.device, torch)
        self._kind = self.config.kind if self.config.kind != "auto" else None
        self._kind = self._kind or _detect_kind(self.model_id)
        self._dtype = _resolve_dtype(self.config.dtype, self._device, torch)
        if self._device.type == "cpu" and self._dtype == torch.float16:
            log.warning("fp16 on CPU is slow or unsupported by some layers; prefer fp32")
        if self._kind == "sdxl":
            self._load_sdxl()
        else:
            self._load_kandinsky()
        self._pipe.set_progress_bar_config(disable=True)

    def _load_sdxl(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        cfg = self.config
        self._pipe = _pipeline(StableDiffusionXLPipeline, self.model_id, "SDXL model", self._dtype)
        self._pipe.to(self._device)
        # Latents are image / vae_scale_factor; the pipeline itself asks for multiples of 8.
        self._size_multiple = max(8, int(self._pipe.vae_scale_factor))
        if cfg.ip_adapter is None:
            return
        # Its warning that ip_adapter_image cannot be used is moot: we pass embeddings.
        quiet = logging.getLogger("diffusers.loaders.ip_adapter")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self._pipe.load_ip_adapter(
                cfg.ip_adapter,
                subfolder=cfg.ip_adapter_subfolder,
                weight_name=cfg.ip_adapter_weight,
                image_encoder_folder=None,  # the reference-image encoder is loaded below
            )
        except _missing_errors() as exc:
            where = f"{cfg.ip_adapter}/{cfg.ip_adapter_subfolder}/{cfg.ip_adapter_weight}"
            raise _not_found("IP-Adapter weights", cfg.ip_adapter, exc, detail=where) from exc
        finally:
            quiet.setLevel(level)
        self._embed_dim = _ip_adapter_dim(self._pipe.unet)
        if cfg.image_encoder is not None:
            self._load_encoder(cfg.image_encoder, required=True)

    def _load_kandinsky(self) -> None:
        from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

        cfg = self.config
        self._pipe = _pipeline(
            KandinskyV22Pipeline, self.model_id, "Kandinsky decoder", self._dtype
        )
        self._pipe.to(self._device)
        self._embed_dim = int(self._pipe.unet.config.encoder_hid_dim)
        # The decoder's latent grid is image / scale and the pipeline rounds it to scale again.
        self._size_multiple = int(self._pipe.movq_scale_factor) ** 2
        if cfg.prior is not None:
            self._prior = _pipeline(
                KandinskyV22PriorPipeline, cfg.prior, "Kandinsky prior", self._dtype
            )
            self._prior.to(self._device)
            self._prior.set_progress_bar_config(disable=True)
            self._encoder, self._processor = self._prior.image_encoder, self._prior.image_processor
            self._encoder_label = _vit_label(self._encoder.config)
        elif cfg.image_encoder is not None:
            self._load_encoder(cfg.image_encoder, required=False)
        if self._encoder is not None:
            # What the prior pairs with its embeddings as "no image": a blank image's embedding.
            self._negative = self._zero_image_embedding()
        else:
            self._negative = np.zeros(self._embed_dim, dtype=np.float32)

    def _load_encoder(self, where: str, *, required: bool) -> None:
        """Load the CLIP vision tower (and its preprocessing) that embeds reference images.

        ``required``: a failure to load, or a projection dim other than ``embed_dim``, raises;
        otherwise it is logged and reference images are not used.
        """
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        subfolder = self.config.image_encoder_subfolder
        if subfolder is None:
            subfolder = _KIND_DEFAULTS[self._kind or "sdxl"].encoder_subfolder
        label = f"{where}/{subfolder}" if subfolder else where
        try:
            config: Any = CLIPVisionConfig.from_pretrained(where, subfolder=subfolder)
        except _missing_errors() as exc:
            if required:
                raise _not_found("image encoder", where, exc, detail=label) from exc
            log.info("no reference-image encoder: cannot read %s (%s)", label, exc)
            return
        if config.projection_dim != self._embed_dim:
            message = (
                f"image encoder {label} projects to {config.projection_dim}-d but the pipeline "
                f"expects {self._embed_dim}-d image embeddings"
            )
            if required:
                raise ValueError(message + "; use the encoder the IP-Adapter was trained with")
            log.info("no reference-image encoder: %s", message)
            return
        try:
            encoder: Any = CLIPVisionModelWithProjection.from_pretrained(where, subfolder=subfolder)
        except _missing_errors() as exc:
            raise _not_found("image encoder", where, exc, detail=label) from exc
        try:
            processor = CLIPImageProcessor.from_pretrained(where, subfolder=subfolder)
        except _missing_errors():  # IP-Adapter repos ship no preprocessor config
            side = int(config.image_size)
            processor = CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side}
            )
        self._encoder = encoder.to(device=self._device, dtype=self._dtype).eval()
        self._processor = processor
        self._encoder_label = _vit_label(config)

    def _zero_image_embedding(self) -> NDArray[np.float32]:
        import torch

        side = int(self._encoder.config.image_size)
        blank = torch.zeros(1, 3, side, side, device=self._device, dtype=self._dtype)
        with torch.inference_mode():
            out = self._encoder(pixel_values=blank).image_embeds
        return np.asarray(out[0].float().cpu().numpy(), dtype=np.float32)

    # --- conditioning -------------------------------------------------------------------------

    def _steps_and_guidance(self) -> tuple[int, float]:
        defaults = _KIND_DEFAULTS[self._kind or "sdxl"]
        steps = self.config.steps if self.config.steps is not None else defaults.steps
        guidance = self.config.guidance_scale
        return steps, defaults.guidance_scale if guidance is None else guidance

    def _condition(self, request: GenerationRequest, norm: float | None) -> _Condition | None:
        """The request's image embedding in the pipeline's space, or None when there is none.

        The catalog vector (unit) is used when its dimension fits; it is scaled to ``norm``
        when given, else to the norm of the reference images' own embeddings when there are
        any, so both sources reach the pipeline at its encoder's scale.
        """
        if self._embed_dim is None:
            return None
        vector = request.image_embedding
        if vector is not None and vector.shape[-1] == self._embed_dim:
            unit = _unit(np.asarray(vector, dtype=np.float32).reshape(-1))
            if norm is None:
                references = self._reference_embeddings(request.reference_images)
                norm = _rank_weighted_mean(references)[1] if len(references) else None
            name = request.embedding_model or "clip"
            source = f"catalog {name} ({self._embed_dim}-d)"
            return _Condition(unit * np.float32(norm or 1.0), source)
        references = self._reference_embeddings(request.reference_images)
        if not len(references):
            return None
        mean, mean_norm = _rank_weighted_mean(references)
        count = len(references)
        source = f"{count} reference image{'s' * (count != 1)} via {self._encoder_label}"
        return _Condition(_unit(mean) * np.float32(mean_norm), source)

    def _reference_embeddings(self, paths: tuple[Path, ...]) -> NDArray[np.float32]:
        """float32 (n, embed_dim) raw (unnormalised) embeddings of the readable reference
        images, best first; (0, embed_dim) without an encoder or readable images."""
        empty = np.zeros((0, self._embed_dim or 0), dtype=np.float32)
        if self._encoder is None or not paths:
            return empty
        images: list[Image.Image] = []
        for path in paths[:MAX_REFERENCE_IMAGES]:
            try:
                images.append(decode_image(Path(path)))
            except ImageRejected as exc:
                log.warning("reference image %s skipped: %s", path, exc)
        if not images:
            return empty
        import torch

        pixels = self._processor(images=images, return_tensors="pt").pixel_values
        with torch.inference_mode():
            out = self._encoder(pixel_values=pixels.to(self._device, self._dtype)).image_embeds
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    # --- the two pipelines --------------------------------------------------------------------

    def _generate_sdxl(
        self,
        request: GenerationRequest,
        width: int,
        height: int,
        generators: list[torch.Generator],
        summary: dict[str, Any],
    ) -> list[Image.Image]:
        import torch

        pipe = self._pipe
        guided = summary["guidance_scale"] > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        negative = request.negative_prompt or self.config.negative_prompt
        kwargs: dict[str, Any] = {}
        if self._embed_dim is None:
            summary["image_embeds"] = "none (no IP-Adapter)"
        else:
            condition = self._condition(request, norm=None)
            scale = self.config.ip_adapter_scale if condition is not None else 0.0
            if condition is None:
                # A loaded IP-Adapter needs embeddings; at scale 0 they do not count.
                embeds = np.zeros(self._embed_dim, dtype=np.float32)
                summary["image_embeds"] = "none (prompt only)"
            else:
                embeds = condition.embeds
                summary["image_embeds"] = condition.source
            summary["ip_adapter_scale"] = scale
            pipe.set_ip_adapter_scale(scale)
            tensor = torch.from_numpy(embeds).view(1, 1, -1)
            if guided:  # the pipeline splits [negative, positive]; zeros mean "no image"
                tensor = torch.cat([torch.zeros_like(tensor), tensor])
            kwargs["ip_adapter_image_embeds"] = [tensor.to(self._device, self._dtype)]
        if guided and negative:
            summary["negative_prompt"] = negative
        result = pipe(
            prompt=request.prompt,
            negative_prompt=negative if guided else None,
            width=width,
            height=height,
            num_inference_steps=summary["steps"],
            guidance_scale=summary["guidance_scale"],
            num_images_per_prompt=request.count,
            generator=generators,
            output_type="pil",
            **kwargs,
        )
        return list(result.images)

    def _generate_kandinsky(
        self,
        request: GenerationRequest,
        width: int,
        height: int,
        generators: list[torch.Generator],
        summary: dict[str, Any],
    ) -> list[Image.Image]:
        import torch

        negative = self._negative
        text: NDArray[np.float32] | None = None
        if self._prior is not None:
            text, negative = self._prior_embeddings(request)
        condition = self._condition(request, norm=_norm(text) if text is not None else None)
        if condition is not None and text is not None:
            weight = self.config.prior_weight
            embeds = weight * text + (1.0 - weight) * condition.embeds
            summary["image_embeds"] = f"prompt via prior ({weight:g}) + {condition.source}"
        elif condition is not None:
            embeds = condition.embeds
            summary["image_embeds"] = condition.source
            summary["prompt"] = "not used (no prior)"
        elif text is not None:
            embeds = text
            summary["image_embeds"] = "prompt via prior"
        else:
            raise ValueError(
                "the Kandinsky decoder needs an image embedding: the request's "
                f"{_describe_vector(request)} does not fit its {self._embed_dim}-d input and "
                "no reference image could be embedded (no image encoder, or no readable "
                "reference images); configure a prior (generator_prior) to generate from the "
                "prompt alone"
            )
        assert negative is not None  # set at load, or by the prior
        # Rows per image, so the pipeline need not repeat them (it does not without guidance).
        rows = torch.from_numpy(np.asarray(embeds, dtype=np.float32)).view(1, -1)
        neg_rows = torch.from_numpy(np.asarray(negative, dtype=np.float32)).view(1, -1)
        result = self._pipe(
            image_embeds=rows.repeat(request.count, 1).to(self._device, self._dtype),
            negative_image_embeds=neg_rows.repeat(request.count, 1).to(self._device, self._dtype),
            width=width,
            height=height,
            num_inference_steps=summary["steps"],
            guidance_scale=summary["guidance_scale"],
            num_images_per_prompt=1,
            generator=generators,
            output_type="pil",
        )
        return list(result.images)

    def _prior_embeddings(
        self, request: GenerationRequest
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(prompt's image embedding, negative embedding), float32 (dim,) each."""
        import torch

        out = self._prior(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or self.config.negative_prompt,
            num_images_per_prompt=1,
            num_inference_steps=PRIOR_STEPS,
            guidance_scale=PRIOR_GUIDANCE,
            generator=torch.Generator(device="cpu").manual_seed(request.seed),
        )
        text = np.asarray(out.image_embeds[0].float().cpu().numpy(), dtype=np.float32)
        negative = np.asarray(out.negative_image_embeds[0].float().cpu().numpy(), dtype=np.float32)
        return text, negative


# --- helpers ----------------------------------------------------------------------------------


def _rank_weighted_mean(rows: NDArray[np.float32]) -> tuple[NDArray[np.float32], float]:
    """Mean of (n, dim) rows weighted 1, 1/2, 1/3, ... by rank, and the same-weighted mean of
    their norms (averaging shrinks the vector; the norm says the scale to give it back)."""
    weights = 1.0 / np.arange(1, len(rows) + 1, dtype=np.float32)
    weights /= weights.sum()
    mean = (weights[:, None] * rows).sum(axis=0).astype(np.float32)
    norm = float((weights * np.linalg.norm(rows, axis=1)).sum())
    return mean, norm


def _unit(vector: NDArray[np.float32]) -> NDArray[np.float32]:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)


def _norm(vector: NDArray[np.float32]) -> float:
    return float(np.linalg.norm(vector))


def _round_to(size: int, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``size`` (halves up), at least one multiple."""
    return max(multiple, (size + multiple // 2) // multiple * multiple)


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _describe_vector(request: GenerationRequest) -> str:
    if request.image_embedding is None:
        return "missing image embedding"
    return f"{request.image_embedding.shape[-1]}-d image embedding"


def _vit_label(config: Any) -> str:
    """The usual name (ViT-H, ...) of a CLIP vision config, else its projection size."""
    key = (int(config.hidden_size), int(config.num_hidden_layers))
    return _VIT_NAMES.get(key, f"CLIP vision ({config.projection_dim}-d)")


def _ip_adapter_dim(unet: Any) -> int:
    """Input dim of the loaded IP-Adapter's image projection (pooled CLIP image embeds)."""
    from diffusers.models.embeddings import ImageProjection

    layers = getattr(unet.encoder_hid_proj, "image_projection_layers", [])
    if len(layers) != 1 or not isinstance(layers[0], ImageProjection):
        kinds = ", ".join(type(layer).__name__ for layer in layers) or "none"
        raise ValueError(
            "only one plain IP-Adapter (pooled image embeddings, e.g. ip-adapter_sdxl_vit-h) is "
            f"supported; the loaded weights give image projections: {kinds}"
        )
    return int(layers[0].image_embeds.in_features)


def _resolve_device(name: str, torch: Any) -> Any:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _resolve_dtype(name: str, device: Any, torch: Any) -> Any:
    """fp16 on CUDA for ``auto`` (SDXL-Turbo and Kandinsky 2.2 ship and are run in fp16)."""
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else can only be a filesystem path."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or name.endswith("/")


def _missing_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the files are not there" (disk, hub cache or hub), not a bug."""
    from huggingface_hub.errors import HFValidationError

    return (OSError, HFValidationError)


def _not_found(
    what: str, model: str, cause: BaseException | None, *, detail: str | None = None
) -> ModelNotFoundError:
    """The one clear error for weights that are neither local nor downloadable."""
    path = Path(model).expanduser()
    lines = [f"Cannot load the {what} {model!r} for image generation."]
    if detail and detail != model:
        lines.append(f"Looked for: {detail}")
    if _looks_like_path(model) or path.exists():
        state = "exists but could not be loaded" if path.exists() else "does not exist"
        lines.append(f"The local directory {path.absolute()} {state}.")
    else:
        lines.append(f"{model!r} is not in the Hugging Face hub cache and could not be downloaded.")
    if cause is not None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else "(no message)"
        lines.append(f"Underlying error: {type(cause).__name__}: {first}")
    cache = "" if _looks_like_path(model) else f" (`hf download {model}` elsewhere, copy HF_HOME)"
    lines.append(
        "The weights must be downloadable from the Hugging Face hub (network, HF_HUB_OFFLINE "
        f"unset), already in its cache{cache}, or given as a local directory as save_pretrained "
        "writes it."
    )
    return ModelNotFoundError("\n".join(lines))


def _pipeline(cls: Any, model: str, what: str, dtype: Any) -> Any:
    """``cls.from_pretrained`` with clear errors; fp16 weight variants first when in fp16."""
    import torch

    path = Path(model).expanduser()
    if _looks_like_path(model) and not path.is_dir():
        raise _not_found(what, model, None)
    where = str(path) if path.is_dir() else model
    dtype_kwarg = _dtype_kwarg(dtype)
    if dtype == torch.float16:
        no_variant: tuple[type[BaseException], ...] = (*_missing_errors(), ValueError)
        try:  # hub repos such as sdxl-turbo ship *.fp16.safetensors: half the download
            return cls.from_pretrained(where, variant="fp16", **dtype_kwarg)
        except no_variant:
            log.debug("no fp16 variant of %s; loading the default weights", model)
    try:
        return cls.from_pretrained(where, **dtype_kwarg)
    except _missing_errors() as exc:
        raise _not_found(what, model, exc) from exc


def _dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype``; older releases know only the first."""
    import diffusers
    from packaging.version import Version

    newer = Version(diffusers.__version__).release >= (0, 42)
    return {"dtype": dtype} if newer else {"torch_dtype": dtype}


def _detect_kind(model: str) -> str:
    """``sdxl`` or ``kandinsky`` from the ``_class_name`` in the model's ``model_index.json``."""
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise _not_found("diffusers pipeline", model, None, detail=str(index))
    elif _looks_like_path(model):
        raise _not_found("diffusers pipeline", model, None)
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(model, "model_index.json"))
        except _missing_errors() as exc:
            raise _not_found("diffusers pipeline", model, exc) from exc
    class_name = str(json.loads(index.read_text()).get("_class_name", ""))
    if class_name.startswith("StableDiffusionXL"):
        return "sdxl"
    if class_name.startswith("KandinskyV22") and "Prior" not in class_name:
        return "kandinsky"
    hint = " (give it as generator_prior)" if "Prior" in class_name else ""
    raise ValueError(
        f"cannot tell the generator kind of {model!r}: model_index.json names "
        f"{class_name or 'no class'}{hint}; supported are StableDiffusionXL* (sdxl) and "
        "KandinskyV22Pipeline (kandinsky); or set generator_kind"
    )
