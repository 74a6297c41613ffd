"""Shared fixtures. Keep each one small; expensive ones are session-scoped."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.sample_dump import SampleDumpSummary, write_sample_dump

SAMPLE_DUMP_COUNT = 40
SAMPLE_DUMP_SEED = 1234


@pytest.fixture(scope="session")
def sample_dump_summary(tmp_path_factory: pytest.TempPathFactory) -> SampleDumpSummary:
    """A 40-image civitai-style sample dump (seed 1234), written once per test session."""
    out_dir = tmp_path_factory.mktemp("sample_dump")
    return write_sample_dump(out_dir, SAMPLE_DUMP_COUNT, SAMPLE_DUMP_SEED)


# --- encoder fixtures (tests/test_encoders.py) -------------------------------------------
# Tiny random-weight models of the real architectures, saved the way real checkpoints are
# laid out, built once per session. Tests never touch the network.
import os as _os  # noqa: E402

_os.environ["HF_HUB_OFFLINE"] = "1"
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte mapped to a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-block, 32-wide DINOv2 ViT (patch 14, 56 px) saved by timm's ``save_for_hf``."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        depth=2,
        embed_dim=32,
        num_heads=2,
        img_size=56,
    )
    with torch.no_grad():  # LayerScale starts at 1e-5; trained DINOv2 sits near 1
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.fill_(1.0)
    out = tmp_path_factory.mktemp("tiny_dinov2")
    # model_args spelled out: timm < 1.0.31 does not record the factory's kwargs by itself
    model_args = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 56, "num_classes": 0}
    save_for_hf(model, str(out), model_args=model_args, safe_serialization=True)
    return str(out)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CLIPModel (2+2 layers, 32 wide, 16-d projection, 32 px images) with a byte-level
    CLIP tokenizer (no merges) and a preprocessor config, as ``save_pretrained`` writes them."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    out = tmp_path_factory.mktemp("tiny_clip")
    vocab: dict[str, int] = {}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for char in _bytes_to_unicode().values():
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(str(out))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(out))
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(out))
    return str(out)


# --- end of encoder fixtures ----------------------------------------------------------------


# --- reliability fixtures (tests/test_reliability_*.py) -------------------------------------


def build_pixels_catalog(dump: Path, catalog_dir: Path) -> Path:
    """Index ``dump`` into a catalog with only the weight-free ``visual`` space (``pixels``):
    the real encoder and service code path, and a server over it is ready in about a second."""
    from indexer.catalog import Catalog
    from indexer.encoders import create_encoder, profile_specs
    from indexer.pipeline import PipelineConfig, index_dump

    encoder = create_encoder(profile_specs("offline")["visual"], device="cpu", dtype="fp32")
    encoder.load()
    with Catalog.create_or_open(catalog_dir, {"visual": encoder.spec}) as catalog:
        index_dump(dump, catalog, {"visual": encoder}, PipelineConfig(progress=False))
    return catalog_dir


@pytest.fixture(scope="session")
def pixels_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image sample dump (seed 21) indexed into a pixels-only catalog, once per session.
    Tests that write to it (feedback) use ids of their own."""
    root = tmp_path_factory.mktemp("pixels_catalog")
    write_sample_dump(root / "dump", 40, 21)
    return build_pixels_catalog(root / "dump", root / "catalog")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI configures logging for the process: put it back for the tests that follow."""
    root, service = logging.getLogger(), logging.getLogger("service")
    handlers, levels = root.handlers[:], (root.level, service.level)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    service.setLevel(levels[1])
