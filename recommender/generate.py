"""The generation fallback: when a session's scroll runs dry, make images where it points.

The engine calls ``Generator.request`` when a page comes out sparse (engine.py). With a
backend configured that is a ``GenerationQueue``: it snapshots what the session wants (a
prompt from its strongest terms and tags, its steered CLIP vector, the images it dwelt on
longest) into a ``GenerationRequest`` and queues it; a worker thread per device runs the
backend, and each image then enters the catalog like any other item, through the same safe
decoder and the catalog's own encoders, in one SQLite transaction with its vectors. The
session that asked finds the new ids leading its next pages; every other session can meet
them through search like any other item.

Backends (``make_backend``):

- ``sample``: the sample dump's renderer driven by the prompt terms; no weights, for the
  demo and the tests. Its items say so in their metadata.
- ``diffusers``: real text-to-image conditioned on the prompt and the steered embedding
  (``generate_diffusers.py``).
- ``none`` (default): no generator; sparse pages still say ``sparse: true``.

A feed request never waits for generation: ``request`` only enqueues.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from indexer.catalog import NewItem
from indexer.images import ImageLimits, decode_image
from indexer.pipeline import encode_batch, hash_bytes
from indexer.records import DumpRecord
from indexer.sample_dump import attributes_from_terms, prompt_for, render_image
from indexer.storage import atomic_write_bytes
from recommender.generation_types import GeneratedImage, GenerationRequest, ImageBackend

if TYPE_CHECKING:
    from recommender.engine import Engine
    from recommender.sessions import Session

log = logging.getLogger(__name__)

BACKENDS = ("none", "sample", "diffusers")
GENERATED_DIR = "generated"  # under the catalog directory


class Generator(Protocol):
    """Makes new images near a session's steered query when the catalog runs dry there."""

    def request(self, session: Session, engine: Engine) -> bool:
        """Queue generation for ``session`` (its lock is held); True when a job is pending."""
        ...

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class GenerationConfig:
    """How much is generated, and the bounds that keep it from hurting the service.

    ``images_per_job`` images per sparse signal, of ``width`` × ``height``. At most
    ``max_queued`` jobs wait (further requests are refused until there is room), a session
    has at most one job pending and starts one at most every ``session_interval_s``, and at
    most ``max_images_per_session`` over its life. A job running past ``timeout_s`` is
    reported failed and its images are dropped. FAISS snapshots are written at most every
    ``checkpoint_interval_s`` (and on close): SQLite holds every generated item at once, so a
    crash in between costs only a rebuild of the snapshot on the next open.
    """

    images_per_job: int = 8
    width: int = 512
    height: int = 512
    max_queued: int = 16
    session_interval_s: float = 10.0
    max_images_per_session: int = 256
    timeout_s: float = 300.0
    checkpoint_interval_s: float = 300.0
    reference_images: int = 4

    def __post_init__(self) -> None:
        if self.images_per_job < 1 or self.max_queued < 1:
            raise ValueError("images_per_job and max_queued must be >= 1")
        if self.width < 64 or self.height < 64:
            raise ValueError("generated images must be at least 64×64")


# -- backends ---------------------------------------------------------------------------------


class SampleBackend:
    """The sample dump's renderer: shapes, colours and textures named by the prompt terms.

    Terms that name an attribute (``red``, ``orbs``, ``striped pattern``) fix it; the rest
    are drawn at random, so a job's images vary around what the session likes. No model, no
    weights: it exists so that the demo and the tests run the whole loop anywhere.
    """

    name = "sample"
    NOTE = (
        "synthetic: drawn by lookalike's sample-dump renderer from the session's prompt terms, "
        "not by an image model"
    )

    def load(self) -> None:
        """Nothing to load."""

    def generate(self, request: GenerationRequest) -> list[GeneratedImage]:
        rng = np.random.default_rng(request.seed)
        out = []
        for i in range(request.count):
            attrs = attributes_from_terms([*request.terms, *request.tags], rng)
            image = render_image(attrs, rng, (request.width, request.height))
            prompt, _ = prompt_for(attrs, rng)
            out.append(
                GeneratedImage(
                    image=image,
                    prompt=prompt,
                    seed=request.seed + i,
                    backend=self.name,
                    conditioning={
                        "note": self.NOTE,
                        "from_prompt": request.prompt,
                        "attributes": dict(attrs),
                    },
                )
            )
        return out


def make_backend(name: str, diffusers_config: Any = None) -> ImageBackend | None:
    """The backend called ``name`` (one of ``BACKENDS``); None for ``none``."""
    if name == "none":
        return None
    if name == "sample":
        return SampleBackend()
    if name == "diffusers":
        from recommender.generate_diffusers import DiffusersBackend, DiffusersConfig

        return DiffusersBackend(diffusers_config or DiffusersConfig())
    raise ValueError(f"unknown generator {name!r}; choose one of {', '.join(BACKENDS)}")


# -- what a session wants ---------------------------------------------------------------------


def build_request(
    session: Session, engine: Engine, config: GenerationConfig, seed: int
) -> GenerationRequest:
    """Snapshot what ``session`` wants (call with its lock held).

    The prompt is its heaviest local-vocabulary terms; the tags are those most common among
    the images it dwelt on longest; the image embedding is its steered CLIP query when the
    catalog has a ``clip`` space.
    """
    terms = tuple(term for term, _ in session.vocabulary.top_terms(8))
    liked = _liked_ids(session, config.reference_images)
    items = [item for item in (engine.catalog.item(i) for i in liked) if item is not None]
    tag_counts = Counter(tag for item in items for tag in item.tags)
    tags = tuple(tag for tag, _ in tag_counts.most_common(8))
    clip = session.query.get("clip")
    clip_entry = engine.catalog.manifest["encoders"].get("clip", {})
    return GenerationRequest(
        session_id=session.id,
        prompt=", ".join(terms),
        terms=terms,
        tags=tags,
        count=config.images_per_job,
        width=config.width,
        height=config.height,
        seed=seed,
        image_embedding=None if clip is None else np.array(clip, dtype=np.float32),
        embedding_model=clip_entry.get("model") if clip is not None else None,
        reference_images=tuple(engine.image_path(item.id) for item in items),
        nsfw_level=max((item.nsfw_level for item in items), default=0),
    )


def _liked_ids(session: Session, n: int) -> list[str]:
    """The ids the session dwelt on longest (positive scores, best first); failing those, the
    best top picks it was served (they are nearest to its query)."""
    liked = sorted((e for e in session.feedback if e.score > 0), key=lambda e: -e.score)
    ids = list(dict.fromkeys(e.image_id for e in liked))
    if not ids:
        tops = sorted((s for s in session.served if s.pick == "top"), key=lambda s: -s.score)
        ids = list(dict.fromkeys(s.image_id for s in tops))
    return ids[:n]


# -- into the catalog -------------------------------------------------------------------------


def store_generated(
    engine: Engine, request: GenerationRequest, images: Sequence[GeneratedImage]
) -> list[str]:
    """Save, decode back, encode and add ``images`` to the engine's catalog; their new ids.

    Each file is written atomically under ``<catalog>/generated/`` first; the items and their
    vectors for every space then go in in one transaction, so a crash leaves at worst an
    unreferenced file, never an item without its image or vectors.
    """
    catalog = engine.catalog
    limits = ImageLimits()
    parent = hashlib.sha256(request.session_id.encode()).hexdigest()[:16]
    news: list[NewItem] = []
    decoded = []
    for generated in images:
        item_id = f"gen-{secrets.token_hex(8)}"
        buffer = io.BytesIO()
        generated.image.convert("RGB").save(buffer, format="PNG")
        data = buffer.getvalue()
        content_hash = hash_bytes(data)
        if catalog.key_for_hash(content_hash) is not None:
            continue  # the backend repeated itself: the image is there already
        relative = f"{GENERATED_DIR}/{item_id}.png"
        path = catalog.path / relative
        atomic_write_bytes(path, data)
        image = decode_image(path.read_bytes(), limits)  # the same safe path as a dump file
        stat = path.stat()
        record = DumpRecord(
            id=item_id,
            image_path=path,
            prompt=generated.prompt or None,
            tags=request.tags,
            nsfw_level=request.nsfw_level,
            model_name=generated.model,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            width=image.width,
            height=image.height,
        )
        meta = {
            "generated": {
                "backend": generated.backend,
                "model": generated.model,
                "seed": generated.seed,
                "prompt": generated.prompt,
                # A digest, not the id: the id is the session's bearer credential.
                "parent_session": parent,
                "conditioning": generated.conditioning,
            }
        }
        news.append(
            NewItem(
                record=record,
                file=relative,
                content_hash=content_hash,
                file_size=stat.st_size,
                file_mtime_ns=stat.st_mtime_ns,
                width=image.width,
                height=image.height,
                source="generated",
                extra_meta=meta,
            )
        )
        decoded.append(image)
    if not news:
        return []
    vectors = encode_batch(engine.encoders, decoded, [n.record for n in news])
    catalog.add(news, vectors)
    return [n.record.id for n in news]


# -- the queue --------------------------------------------------------------------------------


@dataclass
class _Job:
    session: Session
    request: GenerationRequest
    queued_at: float


@dataclass
class GenerationStats:
    requested: int = 0
    refused: int = 0  # queue full, rate limited, session over its budget, backend broken
    completed: int = 0
    failed: int = 0
    images: int = 0
    last_error: str | None = None
    last_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


class GenerationQueue:
    """A bounded job queue with one worker per device, feeding a backend.

    Implements the engine's ``Generator`` protocol. The worker starts on the first request
    (or on ``start``); a backend that fails to load marks the queue broken and every later
    request is refused, with the error kept in ``stats`` and on the session that asked.
    """

    def __init__(
        self,
        backend: ImageBackend,
        config: GenerationConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.config = config or GenerationConfig()
        self._clock = clock
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=self.config.max_queued)
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._last_start: OrderedDict[str, float] = OrderedDict()  # per-session rate limit
        self._made: OrderedDict[str, int] = OrderedDict()  # per-session image budget
        self._engine: Engine | None = None
        self._worker: threading.Thread | None = None
        self._device = ThreadPoolExecutor(1, thread_name_prefix=f"generate-{backend.name}")
        self._broken: str | None = None
        self._closed = False
        self._last_checkpoint = clock()
        self._stats = GenerationStats()
        self._seeds = np.random.SeedSequence()

    # -- the Generator protocol ---------------------------------------------------------------
    def request(self, session: Session, engine: Engine) -> bool:
        if session.pending_generation:
            return True
        now = self._clock()
        with self._lock:
            reason = self._refusal(session.id, now)
            if reason is not None:
                self._stats.refused += 1
                log.debug("generation for session %s… refused: %s", session.id[:6], reason)
                return False
            seed = int(self._seeds.spawn(1)[0].generate_state(1)[0])
            request = build_request(session, engine, self.config, seed)
            try:
                self._jobs.put_nowait(_Job(session, request, now))
            except queue.Full:
                self._stats.refused += 1
                log.warning("generation queue full (%d jobs); request refused", self._jobs.qsize())
                return False
            self._pending.add(session.id)
            self._remember(self._last_start, session.id, now)
            self._stats.requested += 1
        self.start(engine)
        session.generation_error = None
        return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            s = self._stats
            return {
                "generation_requested": s.requested,
                "generation_refused": s.refused,
                "generation_completed": s.completed,
                "generation_failed": s.failed,
                "generated_images": s.images,
                "generation_queued": self._jobs.qsize(),
            }

    @property
    def last_error(self) -> str | None:
        return self._broken or self._stats.last_error

    def start(self, engine: Engine) -> None:
        """Bind to ``engine`` and start the worker (idempotent)."""
        with self._lock:
            if self._worker is not None or self._closed:
                return
            self._engine = engine
            self._worker = threading.Thread(
                target=self._run, name=f"generation-{self.backend.name}", daemon=True
            )
            self._worker.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the job at hand; queued jobs are dropped."""
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None:
            while True:  # make room for the stop marker
                try:
                    self._jobs.put_nowait(None)
                    break
                except queue.Full:
                    self._drop_one()
            worker.join(timeout)
        self._device.shutdown(wait=False, cancel_futures=True)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no job is queued or running (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.01)
        return False

    # -- internals ----------------------------------------------------------------------------
    def _refusal(self, session_id: str, now: float) -> str | None:
        cfg = self.config
        if self._closed:
            return "closed"
        if self._broken is not None:
            return f"backend unavailable: {self._broken}"
        if session_id in self._pending:
            return "a job is pending"
        last = self._last_start.get(session_id)
        if last is not None and now - last < cfg.session_interval_s:
            return "rate limited"
        if self._made.get(session_id, 0) + cfg.images_per_job > cfg.max_images_per_session:
            return "session's image budget spent"
        return None

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > 100_000:  # bounded like the session store
            table.popitem(last=False)

    def _drop_one(self) -> None:
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            return
        if job is not None:
            self._finish(job, [], "dropped: the generator is closing")

    def _run(self) -> None:
        try:
            self._device.submit(self.backend.load).result()
        except Exception as exc:  # noqa: BLE001 - a backend that cannot load must not kill us
            self._broken = f"{type(exc).__name__}: {exc}"
            log.error("generation backend %s failed to load: %s", self.backend.name, exc)
        while True:
            job = self._jobs.get()
            if job is None:
                break
            if self._broken is not None:
                self._finish(job, [], self._broken)
                continue
            self._process(job)
            self._maybe_checkpoint()
        self._checkpoint()

    def _process(self, job: _Job) -> None:
        engine = self._engine
        assert engine is not None
        started = self._clock()
        try:
            future = self._device.submit(self.backend.generate, job.request)
            images = future.result(timeout=self.config.timeout_s)
            ids = store_generated(engine, job.request, images)
        except FutureTimeout:
            self._finish(job, [], f"timed out after {self.config.timeout_s:g} s")
            return
        except Exception as exc:  # noqa: BLE001 - logged and surfaced; the service goes on
            log.exception("generation for session %s… failed", job.session.id[:6])
            self._finish(job, [], f"{type(exc).__name__}: {exc}")
            return
        elapsed = self._clock() - started
        log.info(
            "generated %d images for session %s… in %.2f s (%s)",
            len(ids),
            job.session.id[:6],
            elapsed,
            self.backend.name,
        )
        self._finish(job, ids, None, elapsed)

    def _finish(self, job: _Job, ids: list[str], error: str | None, elapsed: float = 0.0) -> None:
        session = job.session
        with session.lock:
            session.generated_inbox.extend(ids)
            session.pending_generation = False
            session.generation_error = error
        with self._lock:
            self._pending.discard(session.id)
            self._remember(self._made, session.id, self._made.get(session.id, 0) + len(ids))
            if error is None:
                self._stats.completed += 1
                self._stats.images += len(ids)
                self._stats.last_seconds = elapsed
            else:
                self._stats.failed += 1
                self._stats.last_error = error

    def _maybe_checkpoint(self) -> None:
        if not self._jobs.empty():
            return
        if self._clock() - self._last_checkpoint >= self.config.checkpoint_interval_s:
            self._checkpoint()

    def _checkpoint(self) -> None:
        engine = self._engine
        if engine is None:
            return
        try:
            engine.catalog.checkpoint()
        except Exception:  # noqa: BLE001 - SQLite has the items; the snapshot can be rebuilt
            log.exception("writing the FAISS snapshots after generation failed")
        self._last_checkpoint = self._clock()


def make_generator(
    name: str,
    config: GenerationConfig | None = None,
    *,
    diffusers_config: Any = None,
) -> GenerationQueue | None:
    """A queue over the backend called ``name``; None for ``none``."""
    backend = make_backend(name, diffusers_config)
    return None if backend is None else GenerationQueue(backend, config)


__all__ = [
    "BACKENDS",
    "GENERATED_DIR",
    "GeneratedImage",
    "GenerationConfig",
    "GenerationQueue",
    "GenerationRequest",
    "Generator",
    "ImageBackend",
    "SampleBackend",
    "build_request",
    "make_backend",
    "make_generator",
    "store_generated",
]
