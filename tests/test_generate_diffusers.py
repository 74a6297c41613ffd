"""The diffusers generation backend on tiny random pipelines (SDXL + IP-Adapter, Kandinsky 2.2
decoder and prior), built from configs and saved the way hub checkpoints are laid out; the
backend loads them from those directories as it would a user's hub id or local path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from indexer.errors import ModelNotFoundError
from recommender.generate_diffusers import (
    DiffusersBackend,
    DiffusersConfig,
    _rank_weighted_mean,
    _round_to,
)
from recommender.generation_types import GenerationRequest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("diffusers")

IMAGE_DIM = 24  # the tiny CLIP vision tower's projection = the IP-Adapter's / decoder's input
OTHER_DIM = 16  # a catalog CLIP of another size


def _config(model: Path, **fields: Any) -> DiffusersConfig:
    """A config for a tiny checkpoint: 2 steps in fp32 on the CPU."""
    return DiffusersConfig(model=str(model), steps=2, device="cpu", dtype="fp32", **fields)


def _request(embedding: np.ndarray | None = None, **overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "session_id": "s1",
        "prompt": "a red cat on a sofa",
        "terms": ("red", "cat"),
        "tags": ("cat",),
        "count": 2,
        "width": 36,
        "height": 20,
        "seed": 7,
        "image_embedding": embedding,
        "embedding_model": "tiny-clip",
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def _unit_vector(dim: int, seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _pixels(result: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(item.image) for item in result])


# --- tiny checkpoints ---------------------------------------------------------------------------


def _save_tokenizer(out: Path) -> Any:
    """A CLIP BPE tokenizer over printable ASCII (no merges), from vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(out), model_max_length=77)


def _text_config(tokenizer: Any, hidden: int, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vision_encoder() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=IMAGE_DIM,
    )
    return CLIPVisionModelWithProjection(config).eval()


def _ip_adapter_state(unet: Any, image_dim: int) -> dict[str, Any]:
    """Flat IP-Adapter weights for ``unet``: an image projection to 4 tokens, and a key /
    value projection for each cross-attention (numbered 1, 3, 5, ... like the originals)."""
    import torch

    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(4 * cross, image_dim) * 0.5,
        "image_proj.proj.bias": torch.zeros(4 * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        shape = attention.to_k.weight.shape  # (inner dim, cross-attention dim)
        state[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(shape) * 0.5
        state[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(shape) * 0.5
        key += 2
    return state


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block SDXL pipeline (two 32-wide CLIP text towers, 4-channel VAE)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = tmp_path_factory.mktemp("tiny_sdxl")
    tokenizer = _save_tokenizer(out / "vocab")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size ids + pooled text
        cross_attention_dim=64,  # both text towers' hidden states side by side
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(tokenizer, 32, 32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, 32, 32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(out / "pipe"))

    # IP-Adapter repo layout: weights under sdxl_models/, the ViT under models/image_encoder/
    from safetensors.torch import save_file

    (out / "ip" / "sdxl_models").mkdir(parents=True)
    save_file(_ip_adapter_state(unet, IMAGE_DIM), str(out / "ip/sdxl_models/ip-tiny.safetensors"))
    _vision_encoder().save_pretrained(str(out / "ip/models/image_encoder"))
    return out


@pytest.fixture(scope="module")
def tiny_kandinsky_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Kandinsky 2.2 decoder (UNet on 24-d image embeds, 2-block MoVQ) and prior."""
    import torch
    from diffusers import (
        DDPMScheduler,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection

    out = tmp_path_factory.mktemp("tiny_kandinsky")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # mean and variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(16, 32),
        layers_per_block=1,
        encoder_hid_dim=IMAGE_DIM,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = VQModel(
        block_out_channels=(32, 32),  # its spatial norm has 32 groups
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )
    scheduler = DDPMScheduler(
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq).save_pretrained(
        str(out / "decoder")
    )

    tokenizer = _save_tokenizer(out / "vocab")
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=IMAGE_DIM, num_layers=1
    )
    with torch.no_grad():  # clip_std starts at 0, which would zero every output embedding
        prior.clip_std.fill_(1.0)
    KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=_vision_encoder(),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, IMAGE_DIM, IMAGE_DIM)),
        tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
    ).save_pretrained(str(out / "prior"))
    return out


@pytest.fixture(scope="module")
def reference_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    """Three small PNGs of different colours (the images a person dwelt on, best first)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("refs")
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        path = out / f"ref{i}.png"
        image = Image.new("RGB", (48, 40), colour)
        image.paste((255, 255, 255), (8 * i, 8, 8 * i + 16, 24))
        image.save(path)
        paths.append(path)
    return tuple(paths)


@pytest.fixture(scope="module")
def sdxl_backend(tiny_sdxl_dir: Path) -> DiffusersBackend:
    ip = str(tiny_sdxl_dir / "ip")
    config = _config(
        tiny_sdxl_dir / "pipe",
        ip_adapter=ip,
        ip_adapter_weight="ip-tiny.safetensors",
        image_encoder=ip,
        ip_adapter_scale=1.0,
    )
    backend = DiffusersBackend(config)
    backend.load()
    return backend


# --- SDXL + IP-Adapter ---------------------------------------------------------------------------


def test_sdxl_makes_count_images_of_the_requested_size(sdxl_backend: DiffusersBackend) -> None:
    result = sdxl_backend.generate(_request(_unit_vector(IMAGE_DIM, 1)))

    assert sdxl_backend.kind == "sdxl" and sdxl_backend.embed_dim == IMAGE_DIM
    assert len(result) == 2
    assert [item.image.size for item in result] == [(36, 20), (36, 20)]
    assert [item.seed for item in result] == [7, 8]
    first = result[0]
    assert first.backend == "diffusers" and first.model == sdxl_backend.config.model
    assert first.prompt == "a red cat on a sofa"
    assert first.conditioning == {
        "steps": 2,
        "guidance_scale": 0.0,
        "generated_size": [40, 24],
        "image_embeds": f"catalog tiny-clip ({IMAGE_DIM}-d)",
        "ip_adapter_scale": 1.0,
    }
    json.dumps(first.conditioning)  # stored in the item's metadata


def test_sdxl_same_seed_same_pixels_and_the_embedding_conditions(
    sdxl_backend: DiffusersBackend,
) -> None:
    embedding = _unit_vector(IMAGE_DIM, 1)
    first = _pixels(sdxl_backend.generate(_request(embedding)))
    again = _pixels(sdxl_backend.generate(_request(embedding)))
    other = _pixels(sdxl_backend.generate(_request(_unit_vector(IMAGE_DIM, 2))))
    reseeded = _pixels(sdxl_backend.generate(_request(embedding, seed=8, count=1)))

    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1.0
    assert not np.array_equal(first[0], first[1])  # each image has its own seed
    # image i is drawn from seed + i, so it can be remade alone
    assert np.abs(first[1].astype(int) - reseeded[0].astype(int)).max() <= 2


def test_sdxl_embeds_reference_images_when_the_catalog_dim_does_not_fit(
    sdxl_backend: DiffusersBackend, reference_images: tuple[Path, ...]
) -> None:
    wrong_dim = _unit_vector(OTHER_DIM, 1)
    with_refs = sdxl_backend.generate(_request(wrong_dim, reference_images=reference_images))
    one_ref = sdxl_backend.generate(_request(wrong_dim, reference_images=reference_images[2:]))
    prompt_only = sdxl_backend.generate(_request(wrong_dim))

    assert with_refs[0].conditioning["image_embeds"] == "3 reference images via CLIP vision (24-d)"
    assert one_ref[0].conditioning["image_embeds"] == "1 reference image via CLIP vision (24-d)"
    assert prompt_only[0].conditioning["image_embeds"] == "none (prompt only)"
    assert prompt_only[0].conditioning["ip_adapter_scale"] == 0.0
    assert not np.array_equal(_pixels(with_refs), _pixels(one_ref))
    assert not np.array_equal(_pixels(with_refs), _pixels(prompt_only))


def test_sdxl_with_guidance_and_without_ip_adapter(tiny_sdxl_dir: Path) -> None:
    ip = str(tiny_sdxl_dir / "ip")
    guided = DiffusersBackend(
        _config(
            tiny_sdxl_dir / "pipe",
            kind="sdxl",
            ip_adapter=ip,
            ip_adapter_weight="ip-tiny.safetensors",
            image_encoder=None,
            guidance_scale=3.0,
            negative_prompt="blurry",
        )
    )
    result = guided.generate(_request(_unit_vector(IMAGE_DIM, 1), width=32, height=24))
    assert [item.image.size for item in result] == [(32, 24)] * 2
    assert result[0].conditioning["negative_prompt"] == "blurry"
    assert result[0].conditioning["ip_adapter_scale"] == 0.6
    assert "generated_size" not in result[0].conditioning

    plain = DiffusersBackend(_config(tiny_sdxl_dir / "pipe", ip_adapter=None))
    result = plain.generate(_request(_unit_vector(IMAGE_DIM, 1), count=1))
    assert plain.embed_dim is None
    assert result[0].conditioning["image_embeds"] == "none (no IP-Adapter)"


# --- Kandinsky 2.2 -------------------------------------------------------------------------------


def test_kandinsky_decoder_from_an_image_embedding(
    tiny_kandinsky_dir: Path, reference_images: tuple[Path, ...]
) -> None:
    backend = DiffusersBackend(_config(tiny_kandinsky_dir / "decoder", image_encoder=None))
    result = backend.generate(_request(_unit_vector(IMAGE_DIM, 1), width=30, height=22))
    again = backend.generate(_request(_unit_vector(IMAGE_DIM, 1), width=30, height=22))

    assert backend.kind == "kandinsky" and backend.embed_dim == IMAGE_DIM  # from model_index
    assert [item.image.size for item in result] == [(30, 22), (30, 22)]
    assert result[0].conditioning["image_embeds"] == f"catalog tiny-clip ({IMAGE_DIM}-d)"
    assert result[0].conditioning["prompt"] == "not used (no prior)"
    assert result[0].conditioning["guidance_scale"] == 4.0
    np.testing.assert_array_equal(_pixels(result), _pixels(again))
    with pytest.raises(ValueError, match="needs an image embedding"):
        backend.generate(_request(_unit_vector(OTHER_DIM, 1), reference_images=reference_images))


def test_kandinsky_embeds_references_with_a_matching_encoder(
    tiny_kandinsky_dir: Path, tiny_sdxl_dir: Path, reference_images: tuple[Path, ...]
) -> None:
    backend = DiffusersBackend(
        _config(
            tiny_kandinsky_dir / "decoder",
            kind="kandinsky",
            image_encoder=str(tiny_kandinsky_dir / "prior"),  # its image_encoder/ subfolder
            guidance_scale=1.0,
        )
    )
    result = backend.generate(
        _request(_unit_vector(OTHER_DIM, 1), reference_images=reference_images)
    )
    assert result[0].conditioning["image_embeds"] == "3 reference images via CLIP vision (24-d)"
    assert [item.image.size for item in result] == [(36, 20)] * 2


def test_kandinsky_prior_blends_the_prompt_with_the_embedding(tiny_kandinsky_dir: Path) -> None:
    backend = DiffusersBackend(
        _config(
            tiny_kandinsky_dir / "decoder",
            prior=str(tiny_kandinsky_dir / "prior"),
            prior_weight=0.5,
        )
    )
    embedding = _unit_vector(IMAGE_DIM, 1)
    cat = backend.generate(_request(embedding, count=1))
    dog = backend.generate(_request(embedding, count=1, prompt="a blue dog"))
    text_only = backend.generate(_request(None, count=1))

    assert cat[0].conditioning["image_embeds"] == (
        f"prompt via prior (0.5) + catalog tiny-clip ({IMAGE_DIM}-d)"
    )
    assert text_only[0].conditioning["image_embeds"] == "prompt via prior"
    assert not np.array_equal(_pixels(cat), _pixels(dog))


# --- errors, config, helpers --------------------------------------------------------------------


def test_missing_local_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    backend = DiffusersBackend(_config(missing))
    with pytest.raises(ModelNotFoundError) as info:
        backend.load()
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert "downloadable" in message and "local directory" in message


def test_uncached_hub_model_says_how_to_provide_it() -> None:
    backend = DiffusersBackend(DiffusersConfig(model="nobody/no-such-model", device="cpu"))
    with pytest.raises(ModelNotFoundError) as info:
        backend.load()
    message = str(info.value)
    assert "'nobody/no-such-model'" in message and "hub cache" in message
    assert "hf download nobody/no-such-model" in message


def test_uncached_ip_adapter_names_it(tiny_sdxl_dir: Path) -> None:
    backend = DiffusersBackend(_config(tiny_sdxl_dir / "pipe", ip_adapter="nobody/no-such-adapter"))
    with pytest.raises(ModelNotFoundError, match="IP-Adapter weights 'nobody/no-such-adapter'"):
        backend.load()


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="kind"):
        DiffusersConfig(kind="flux")
    with pytest.raises(ValueError, match="prior_weight"):
        DiffusersConfig(prior_weight=1.5)
    with pytest.raises(ValueError, match="dtype"):
        DiffusersConfig(dtype="int8")


def test_round_and_rank_weighted_mean() -> None:
    assert [_round_to(n, 8) for n in (36, 20, 3, 1000)] == [40, 24, 8, 1000]
    rows = np.array([[3.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    mean, norm = _rank_weighted_mean(rows)
    np.testing.assert_allclose(mean, [2.0, 1.0])  # weights 2/3, 1/3
    assert norm == pytest.approx(3.0)


def test_importing_the_module_does_not_import_diffusers() -> None:
    code = (
        "import sys, recommender.generate_diffusers; "
        "sys.exit(any(m in sys.modules for m in ('diffusers', 'torch')))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
