"""Dump -> catalog: read records, decode ahead of the encoders, batch, encode, commit, resume.

Decoding runs on a thread pool ahead of the encoders (PIL releases the GIL while decoding), in
a bounded window so memory stays flat. The same workers resize and crop each image for every
image encoder, so the main thread only runs the models: on one H200 that CPU work, done on a
single thread, held decoding and encoding to about 200 images/s (benchmarks/RESULTS.md,
"GPU path").

Each batch is one SQLite transaction, so a run killed at any point resumes from the last
committed batch; unchanged files (same size and mtime) are not read again, and exact
duplicates (same content hash) are stored once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from indexer.alignment import TextImageEncoder, align_catalog
from indexer.catalog import Catalog, NewItem
from indexer.dump import JSON_EXTENSIONS, iter_dump
from indexer.encoders.base import Encoder, ImageEncoder
from indexer.errors import ImageRejected
from indexer.images import ImageLimits, decode_image
from indexer.records import DumpRecord, SkippedEntry
from indexer.text import text_for_embedding

log = logging.getLogger(__name__)

POSITIONS_BATCH = 1000  # dump positions recorded per transaction
FILE_CHECKS_BATCH = 256  # files looked up in the catalog per query


@dataclass(frozen=True)
class Shard:
    """A deterministic 1/count slice of a dump, chosen by a hash of each item's id."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"shard index must be in 0..{count - 1}, got {index}")
        return cls(index, count)

    def owns(self, item_id: str) -> bool:
        return zlib.crc32(item_id.encode()) % self.count == self.index


def default_decode_workers() -> int:
    """One decode worker per core, up to 16: they decode, resize and crop, and on a GPU box
    they are what keeps the models fed (benchmarks/RESULTS.md, "GPU path")."""
    return min(os.cpu_count() or 2, 16)


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 32
    decode_workers: int = field(default_factory=default_decode_workers)
    prefetch_batches: int = 4
    checkpoint_seconds: float = 60.0
    limits: ImageLimits = field(default_factory=ImageLimits)
    # JPEGs decode at reduced scale down to this short side; None: what the encoders need.
    draft_size: int | None = None
    progress: bool = True
    shard: Shard | None = None


@dataclass
class IndexReport:
    """Counts for the one-line summary at the end of a run."""

    indexed: int = 0
    unchanged: int = 0
    metadata_updated: int = 0
    duplicates: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    aligned: int = 0  # prompt-image alignment scores computed (catalogs with a clip space)
    # JSON files (or lines) skipped as unparsable or unreadable: the images they describe went
    # in without metadata, unrated
    unread_metadata: int = 0

    @property
    def images_per_s(self) -> float:
        return self.indexed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
        return (
            f"indexed {self.indexed}, unchanged {self.unchanged}, "
            f"metadata updated {self.metadata_updated}, duplicates {self.duplicates}, "
            f"skipped {skipped}{f' ({reasons})' if reasons else ''}, "
            + (f"alignment scored {self.aligned}, " if self.aligned else "")
            + f"{self.elapsed_s:.1f} s, {self.images_per_s:.1f} images/s"
        )

    def warnings(self) -> list[str]:
        """What the user should act on, beyond the counts."""
        if not self.unread_metadata:
            return []
        return [
            f"{self.unread_metadata} JSON file(s) or line(s) could not be read "
            "(`lookalike -v index` names them): the images they describe went in without "
            "their metadata, rated None. Fix them and run `lookalike index` again; those "
            "items then take their metadata."
        ]

    def to_json(self) -> dict[str, object]:
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "metadata_updated": self.metadata_updated,
            "duplicates": self.duplicates,
            "skipped": dict(self.skipped),
            "aligned": self.aligned,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.images_per_s, 2),
        }


@dataclass(frozen=True)
class Decoded:
    """A record whose file was read, hashed and decoded (or rejected with a reason)."""

    record: DumpRecord
    file: str
    size: int
    mtime_ns: int
    content_hash: str
    image: Image.Image | None = None
    rejection: ImageRejected | None = None
    # space -> this image as that space's ImageEncoder.preprocess made it (one row)
    prepared: dict[str, Any] = field(default_factory=dict)


def hash_bytes(data: bytes) -> str:
    """The catalog's content hash: BLAKE2b-128 of the file bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_file(record: DumpRecord, config: PipelineConfig) -> Decoded:
    """Read, hash and decode one record's image; never raises for bad image bytes."""
    path = record.image_path
    stat = path.stat()
    base = dict(record=record, file=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    if stat.st_size > config.limits.max_bytes:
        rejection = ImageRejected("too_large", f"{stat.st_size} bytes is over the limit")
        return Decoded(**base, content_hash="", rejection=rejection)  # type: ignore[arg-type]
    data = path.read_bytes()
    content_hash = hash_bytes(data)
    try:
        image = decode_image(data, config.limits, draft_size=config.draft_size)
    except ImageRejected as exc:
        return Decoded(**base, content_hash=content_hash, rejection=exc)  # type: ignore[arg-type]
    return Decoded(**base, content_hash=content_hash, image=image)  # type: ignore[arg-type]


def prepare(item: Decoded, encoders: Mapping[str, Encoder]) -> Decoded:
    """``item`` with its image preprocessed for every image encoder (a decode worker's job)."""
    if item.image is None:
        return item
    image = item.image
    prepared = {
        space: encoder.preprocess([image])
        for space, encoder in encoders.items()
        if isinstance(encoder, ImageEncoder)
    }
    return replace(item, prepared=prepared) if prepared else item


def encode_batch(
    encoders: Mapping[str, Encoder],
    images: list[Image.Image],
    records: list[DumpRecord],
    prepared: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, np.ndarray]:
    """Vectors for every space: image encoders see the images, the text encoder the prompts.

    ``prepared`` (one mapping per image, from :func:`prepare`) spares the image encoders their
    preprocessing. Items without any text get a zero vector in the text space (they match no
    prompt).
    """
    vectors: dict[str, np.ndarray] = {}
    for space, encoder in encoders.items():
        if isinstance(encoder, ImageEncoder) and prepared and all(space in p for p in prepared):
            rows = np.concatenate([p[space] for p in prepared])
            step = encoder.batch_size
            vectors[space] = np.concatenate(
                [encoder.forward(rows[i : i + step]) for i in range(0, len(rows), step)]
            )
        elif space == "text":
            texts = [text_for_embedding(r.prompt, r.tags) for r in records]
            block = np.zeros((len(records), encoder.dim), dtype=np.float32)
            present = [i for i, t in enumerate(texts) if t]
            if present:
                block[present] = encoder.embed_batch([texts[i] for i in present])
            vectors[space] = block
        else:
            vectors[space] = encoder.embed_batch(images)
    return vectors


class _Batcher:
    """Collects decoded items, deduplicates by content hash, and commits full batches."""

    def __init__(
        self, catalog: Catalog, encoders: Mapping[str, Encoder], report: IndexReport, size: int
    ) -> None:
        self.catalog, self.encoders, self.report, self.size = catalog, encoders, report, size
        self.pending: list[Decoded] = []
        self.pending_hashes: dict[str, int] = {}
        self.waiting_duplicates: list[Decoded] = []

    def add(self, item: Decoded) -> None:
        existing = self.catalog.key_for_hash(item.content_hash)
        # Re-stored in place only when these bytes are stored under this very id (its file was
        # moved or touched); an id known as an alias of them stays an alias.
        own_key = self.catalog.key_for_id(item.record.id, follow_aliases=False)
        if existing is not None and own_key != existing:
            self._duplicate(item, existing)
        elif existing is None and item.content_hash in self.pending_hashes:
            self.waiting_duplicates.append(item)
        else:
            self.pending_hashes[item.content_hash] = len(self.pending)
            self.pending.append(item)
            if len(self.pending) >= self.size:
                self.flush()

    def flush(self) -> None:
        if self.pending:
            images = [d.image for d in self.pending if d.image is not None]
            records = [d.record for d in self.pending]
            prepared = [d.prepared for d in self.pending]
            vectors = encode_batch(self.encoders, images, records, prepared)
            self.catalog.add([_new_item(d) for d in self.pending], vectors)
            self.report.indexed += len(self.pending)
            self.pending, self.pending_hashes = [], {}
        for item in self.waiting_duplicates:
            key = self.catalog.key_for_hash(item.content_hash)
            if key is not None:
                self._duplicate(item, key)
        self.waiting_duplicates = []

    def _duplicate(self, item: Decoded, of_key: int) -> None:
        if self.catalog.key_for_id(item.record.id, follow_aliases=False) is not None:
            # The id's file now holds another item's bytes: it is an alias, no longer an item.
            self.catalog.delete([item.record.id])
        self.catalog.add_duplicate(item.record.id, of_key, item.file, item.size, item.mtime_ns)
        self.report.duplicates += 1


def _new_item(d: Decoded) -> NewItem:
    assert d.image is not None
    # The file's size, as served: a dump's width and height are often the original's, larger
    # than the copy downloaded (civitai's width=... URLs).
    width, height = d.image.info.get("source_size", d.image.size)
    return NewItem(
        record=d.record,
        file=d.file,
        content_hash=d.content_hash,
        file_size=d.size,
        file_mtime_ns=d.mtime_ns,
        width=width,
        height=height,
    )


def index_dump(
    root: Path,
    catalog: Catalog,
    encoders: Mapping[str, Encoder],
    config: PipelineConfig | None = None,
    on_progress: Callable[[IndexReport], None] | None = None,
) -> IndexReport:
    """Index every new or changed image of the dump at ``root`` into ``catalog``."""
    config = config or PipelineConfig()
    report = IndexReport()
    dump_root = root.resolve()
    started = time.monotonic()
    last_checkpoint = started
    if config.draft_size is None:
        sides = [getattr(e, "min_side", 0) for e in encoders.values() if e.space != "text"]
        config = replace(config, draft_size=max(sides, default=0) or None)
    # Encoders load lazily on the first batch, so a run with nothing new starts no model.
    batcher = _Batcher(catalog, encoders, report, config.batch_size)
    bar = tqdm(unit="img", desc="indexing", disable=not config.progress, dynamic_ncols=True)
    try:
        for item in _decoded_stream(root, catalog, encoders, config, report):
            if item.rejection is not None:
                report.skipped[item.rejection.reason] += 1
                catalog.record_skip(
                    item.file, item.rejection.reason, str(item.rejection), item.size, item.mtime_ns
                )
                # As the dump's skips are logged: the path in the dump, the reason, the detail.
                shown = os.path.relpath(item.file, dump_root)
                log.info("skipped %s: %s %s", shown, item.rejection.reason, item.rejection)
            else:
                batcher.add(item)
            bar.update(1)
            if time.monotonic() - last_checkpoint > config.checkpoint_seconds:
                batcher.flush()
                catalog.checkpoint()
                last_checkpoint = time.monotonic()
            if on_progress is not None:
                on_progress(report)
        batcher.flush()
        clip = encoders.get("clip")
        if isinstance(clip, TextImageEncoder):  # also scores earlier items that lack a score
            report.aligned = align_catalog(catalog, clip, progress=config.progress)
        catalog.checkpoint()
    finally:
        bar.close()
        report.elapsed_s = time.monotonic() - started
    return report


def _decoded_stream(
    root: Path,
    catalog: Catalog,
    encoders: Mapping[str, Encoder],
    config: PipelineConfig,
    report: IndexReport,
) -> Iterator[Decoded]:
    """Decoded and prepared records in dump order, up to ``prefetch_batches`` batches ahead."""
    window = max(1, config.prefetch_batches * config.batch_size)

    def work(record: DumpRecord) -> Decoded:
        return prepare(decode_file(record, config), encoders)

    with ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode") as pool:
        inflight: deque[Future[Decoded]] = deque()
        for record in _records_to_process(root, catalog, config, report):
            inflight.append(pool.submit(work, record))
            if len(inflight) >= window:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()


def _records_to_process(
    root: Path, catalog: Catalog, config: PipelineConfig, report: IndexReport
) -> Iterator[DumpRecord]:
    """Dump records whose files are new or changed; unchanged ones are counted and passed over.

    Every record's position in the dump's order is recorded (see ``lookalike merge``)."""
    dump_root = root.resolve()
    positions: list[tuple[str, int]] = []
    stated: list[tuple[DumpRecord, os.stat_result]] = []
    for position, entry in enumerate(iter_dump(root)):
        if isinstance(entry, SkippedEntry):
            report.skipped[entry.reason] += 1
            log.info("skipped %s: %s %s", entry.path, entry.reason, entry.detail)
            if entry.reason == "bad_json" or (
                entry.reason == "unreadable" and entry.path.lower().endswith(tuple(JSON_EXTENSIONS))
            ):
                report.unread_metadata += 1
            continue
        if config.shard is not None and not config.shard.owns(entry.id):
            continue
        positions.append((entry.id, position))
        if len(positions) >= POSITIONS_BATCH:
            catalog.record_dump_positions(positions)
            positions = []
        try:
            stated.append((entry, entry.image_path.stat()))
        except OSError as exc:
            report.skipped["unreadable"] += 1
            shown = os.path.relpath(entry.image_path, dump_root)
            log.info("skipped %s: unreadable %s", shown, exc)
            continue
        if len(stated) >= FILE_CHECKS_BATCH:
            yield from _new_or_changed(stated, catalog, report)
            stated = []
    yield from _new_or_changed(stated, catalog, report)
    catalog.record_dump_positions(positions)


def _new_or_changed(
    stated: list[tuple[DumpRecord, os.stat_result]], catalog: Catalog, report: IndexReport
) -> Iterator[DumpRecord]:
    """The records whose files the catalog does not know as they are now (one lookup for
    all of them: each SQLite call on this thread waits for the GIL the decode pool holds)."""
    states = catalog.file_states([str(entry.image_path) for entry, _ in stated])
    for entry, stat in stated:
        state = states.get(str(entry.image_path))
        unchanged = (
            state is not None
            and state.file_size == stat.st_size
            and state.file_mtime_ns == stat.st_mtime_ns
        )
        if not unchanged or state is None:
            yield entry
        elif state.kind == "item" and state.id == entry.id:
            report.unchanged += 1
            if catalog.update_metadata(entry.id, entry):
                report.metadata_updated += 1
        elif (
            state.kind == "item"
            and entry.bare_id is not None
            and state.id == entry.bare_id
            and catalog.rename(state.id, entry.id)
        ):
            # Indexed bare, and its metadata came since (a JSON page or sidecar added, or one
            # that could not be read now can): the item takes the record's id and metadata,
            # its bare id stays as an alias.
            report.unchanged += 1
            catalog.update_metadata(entry.id, entry)
            report.metadata_updated += 1
        elif state.kind == "skipped":
            report.skipped[state.id or "rejected"] += 1
        elif state.kind == "duplicate" and state.id == entry.id:
            report.duplicates += 1
        else:
            yield entry
