"""GPU path: end-to-end images/s (decode + DINOv2-S + CLIP-B/32) and FAISS on the GPU.

    python benchmarks/gpu.py --images 2048 --batch-size 256 --json OUT.json

Runs only where CUDA is available. The baseline, measured in the same run on the same GPU, is
the encoders in fp32 with one decode thread; the optimized path is bf16 with a pool of decode
workers (JPEG draft mode, then each encoder's resize and crop) keeping the GPU fed. The
``index_dump_bf16`` row is the indexing pipeline itself (``lookalike index``: decode pool,
batches, SQLite and FAISS writes) over as many distinct JPEGs. Models are the default profile's
architectures with random weights built from their configs (no download). Cosine columns
compare the bf16 vectors with the fp32 ones. FAISS rows run when faiss imports with GPUs:
exact search on the CPU and on the GPU, then the catalog's own IVF build
(``VectorIndex.rebuild``, training, adding and nprobe tuning) with ``use_gpu`` off and on, on
clustered vectors (``benchmarks/large_index.py``'s mixture) so that recall means something.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.encode import build_models, decode_draft, decode_full, make_jpegs  # noqa: E402
from indexer.encoders import Encoder, ImageEncoder, create_encoder  # noqa: E402


def encode_all(
    paths: Sequence[Path],
    encoders: Sequence[ImageEncoder],
    batch_size: int,
    workers: int,
    draft: bool,
) -> tuple[float, list[np.ndarray]]:
    """Seconds to decode + embed every path with every encoder, and the vectors.

    As in the indexing pipeline, ``workers`` threads decode and preprocess each image for
    every encoder while this thread runs the models on the batch before."""
    decode = (lambda p: decode_draft(p, 224)) if draft else decode_full

    def prepare_one(path: Path) -> list[Any]:
        image = decode(path)
        return [encoder.preprocess([image]) for encoder in encoders]

    def prepare(start: int) -> list[Any]:
        rows = list(pool.map(prepare_one, paths[start : start + batch_size]))
        return [np.concatenate([row[i] for row in rows]) for i in range(len(encoders))]

    outputs: list[list[np.ndarray]] = [[] for _ in encoders]
    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max(workers, 1)) as pool, ThreadPoolExecutor(1) as ahead:
        begin = time.perf_counter()
        future = ahead.submit(prepare, starts[0])
        for k in range(len(starts)):
            batch = future.result()
            if k + 1 < len(starts):
                future = ahead.submit(prepare, starts[k + 1])
            for i, encoder in enumerate(encoders):
                outputs[i].append(encoder.forward(batch[i]))
        elapsed = time.perf_counter() - begin
    return elapsed, [np.concatenate(parts) for parts in outputs]


def index_dump_rate(
    unique: Sequence[Path], count: int, encoders: dict[str, Encoder], args: argparse.Namespace
) -> dict[str, Any]:
    """``lookalike index``'s pipeline (decode pool, batches, SQLite and FAISS writes) over a
    dump of ``count`` distinct JPEGs: copies of ``unique`` told apart by a comment segment."""
    from indexer.catalog import Catalog
    from indexer.pipeline import PipelineConfig, index_dump

    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "dump"
        dump.mkdir()
        for i in range(count):
            data = unique[i % len(unique)].read_bytes()
            comment = f"copy {i}".encode()
            marker = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
            (dump / f"{i:06d}.jpg").write_bytes(data[:2] + marker + data[2:])
        specs = {space: encoder.spec for space, encoder in encoders.items()}
        with Catalog.create_or_open(Path(tmp) / "catalog", specs) as catalog:
            config = PipelineConfig(
                batch_size=args.batch_size, decode_workers=args.workers, progress=False
            )
            start = time.perf_counter()
            report = index_dump(dump, catalog, encoders, config)
            elapsed = time.perf_counter() - start
    return {"images": report.indexed, "seconds": elapsed, "images_per_s": report.indexed / elapsed}


def faiss_rows(n: int, dim: int, queries: int) -> list[dict[str, Any]]:
    try:
        import faiss
    except ImportError as exc:  # the wheel or its CUDA libraries are missing
        return [{"name": "faiss", "error": f"faiss did not import: {exc}"}]
    if faiss.get_num_gpus() == 0:
        return [{"name": "faiss", "error": "faiss imported but sees no GPU"}]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    q = x[rng.choice(n, queries, replace=False)]
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(x)
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
    rows = []
    for name, index in (("flat cpu", cpu), ("flat gpu", gpu)):
        index.search(q[:8], 100)
        start = time.perf_counter()
        _, found = index.search(q, 100)
        elapsed = time.perf_counter() - start
        rows.append({"name": f"{name} {n}x{dim}", "qps": queries / elapsed, "ids": found})
    agree = float(
        np.mean(
            [
                len(set(a) & set(b)) / 100
                for a, b in zip(rows[0]["ids"], rows[1]["ids"], strict=True)
            ]
        )
    )
    for r in rows:
        del r["ids"]
        r["recall_vs_cpu"] = agree
    return rows


def ivf_build_rows(n: int, dim: int) -> list[dict[str, Any]]:
    """The catalog's IVF build of ``n`` vectors with ``use_gpu`` off (baseline) and on."""
    import faiss

    from benchmarks.large_index import Mixture
    from indexer.vector_index import IndexPolicy, VectorIndex

    if faiss.get_num_gpus() == 0:
        return [{"name": "ivf build", "error": "faiss sees no GPU"}]
    vectors = Mixture(dim, seed=0).chunk(0, n)
    keys = np.arange(n, dtype=np.int64)
    rows, found = [], []
    for use_gpu in (False, True):
        index = VectorIndex(dim, IndexPolicy(use_gpu=use_gpu, compressed_limit=n))
        start = time.perf_counter()
        index.rebuild(keys, vectors)
        elapsed = time.perf_counter() - start
        info = index.info
        found.append(index.search(vectors[:200], 100)[1])
        rows.append(
            {
                "name": f"ivf build {'gpu' if use_gpu else 'cpu'} {n}x{dim}",
                "seconds": elapsed,
                "kind": info.kind,
                "nprobe": info.nprobe,
                "measured_recall": info.measured_recall,
            }
        )
    agree = float(
        np.mean([len(set(a) & set(b)) / 100 for a, b in zip(found[0], found[1], strict=True)])
    )
    for row in rows:
        row["top100_overlap_cpu_vs_gpu"] = agree
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 4)
    parser.add_argument("--faiss-n", type=int, default=1_000_000)
    parser.add_argument("--ivf-n", type=int, default=500_000, help="0 skips the IVF build rows")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        models = build_models(tmp_path / "models")
        (tmp_path / "jpegs").mkdir()
        unique = make_jpegs(tmp_path / "jpegs", 128, seed=0)
        paths = [unique[i % len(unique)] for i in range(args.images)]

        batch = {"batch_size": args.batch_size}

        def encoders(dtype: str) -> list[ImageEncoder]:
            made = [
                create_encoder(name, model=models[name], device=args.device, dtype=dtype, **batch)
                for name in ("dinov2", "clip")
            ]
            for encoder in made:
                encoder.load()
            return made  # type: ignore[return-value]

        fp32, bf16 = encoders("fp32"), encoders("bf16")
        warm = paths[: args.batch_size]
        encode_all(warm, fp32, args.batch_size, 1, False)
        encode_all(warm, bf16, args.batch_size, args.workers, True)
        base_s, base_vecs = encode_all(paths, fp32, args.batch_size, 1, False)
        fast_s, fast_vecs = encode_all(paths, bf16, args.batch_size, args.workers, True)
        # GPU-only throughput: the same preprocessed batch through the models, no decoding.
        batch = [e.preprocess([decode_draft(p, 224) for p in warm]) for e in bf16]
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(8):
            for e, b in zip(bf16, batch, strict=True):
                e.forward(b)
        if cuda:
            torch.cuda.synchronize()
        model_only = 8 * len(warm) / (time.perf_counter() - start)
        pipeline = index_dump_rate(unique, args.images, {e.space: e for e in bf16}, args)

    cosines = [
        float(np.min(np.sum(a * b, axis=1))) for a, b in zip(base_vecs, fast_vecs, strict=True)
    ]
    result: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "images": args.images,
        "batch_size": args.batch_size,
        "decode_workers": args.workers,
        "baseline_fp32_serial_decode_images_per_s": args.images / base_s,
        "bf16_pooled_decode_images_per_s": args.images / fast_s,
        "speedup": base_s / fast_s,
        "models_only_bf16_images_per_s": model_only,
        "index_dump_bf16": pipeline,
        "min_cosine_bf16_vs_fp32": {"dinov2": cosines[0], "clip": cosines[1]},
        "faiss": faiss_rows(args.faiss_n, 384, 1000),
        "ivf_build": ivf_build_rows(args.ivf_n, 384) if args.ivf_n else [],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
