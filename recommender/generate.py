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

import contextlib
import hashlib
import io
import logging
import math
import multiprocessing
import os
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from indexer.alignment import TextImageEncoder, alignment_scores, scoring_text
from indexer.catalog import NewItem
from indexer.encoders.base import Encoder
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

    def start(self, engine: Engine) -> None:
        """Start the worker now (it loads its models) rather than on the first request."""
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

    ``worker``: ``process`` runs the backend and a copy of the catalog's encoders (on
    ``encoder_device`` / ``encoder_dtype``) in a child process at ``nice`` + ``worker_nice``;
    ``thread`` runs them in this process, with the engine's encoders.
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
    worker: Literal["process", "thread"] = "process"
    worker_nice: int = 10
    encoder_device: str | None = None
    encoder_dtype: str = "fp32"

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
    items = engine.catalog.items(_liked_keys(session, config.reference_images))
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


def _liked_keys(session: Session, n: int) -> list[int]:
    """The keys of the items the session dwelt on longest (positive scores, best first);
    failing those, of the best top picks it was served (they are nearest to its query)."""
    feedback, served = session.feedback, session.served
    liked = (feedback["score"] > 0) & (feedback["key"] >= 0)
    keys = feedback["key"][liked][np.argsort(-feedback["score"][liked], kind="stable")]
    if not len(keys):
        top = ~served["explore"]
        keys = served["key"][top][np.argsort(-served["score"][top], kind="stable")]
    return list(dict.fromkeys(keys.tolist()))[:n]


# -- making: images to encoded items ---------------------------------------------------------


@dataclass(frozen=True)
class Made:
    """One generated image, PNG-encoded, decoded back and encoded for every space."""

    png: bytes
    width: int
    height: int
    vectors: dict[str, NDArray[np.float32]]
    prompt: str
    seed: int
    backend: str
    model: str | None
    conditioning: dict[str, Any]
    alignment: float | None = None  # 100 × CLIP cosine of image and prompt (clip space only)


def render_and_encode(
    backend: ImageBackend, encoders: Mapping[str, Encoder], request: GenerationRequest
) -> list[Made]:
    """Run the backend, then treat each image like a dump file: PNG bytes, decoded back
    through the same safe decoder, encoded by the catalog's encoders (the text space sees the
    prompt and tags)."""
    images = backend.generate(request)
    limits = ImageLimits()
    pngs, decoded, records = [], [], []
    for i, generated in enumerate(images):
        buffer = io.BytesIO()
        generated.image.convert("RGB").save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        decoded.append(decode_image(pngs[-1], limits))
        records.append(
            DumpRecord(id=str(i), image_path=Path(), prompt=generated.prompt, tags=request.tags)
        )
    if not images:
        return []
    vectors = encode_batch(encoders, decoded, records)
    alignment = _alignment(encoders, vectors, [g.prompt for g in images])
    return [
        Made(
            png=png,
            width=image.width,
            height=image.height,
            vectors={space: block[i] for space, block in vectors.items()},
            prompt=generated.prompt,
            seed=generated.seed,
            backend=generated.backend,
            model=generated.model,
            conditioning=generated.conditioning,
            alignment=None if alignment is None or np.isnan(alignment[i]) else float(alignment[i]),
        )
        for i, (png, generated, image) in enumerate(zip(pngs, images, decoded, strict=True))
    ]


def _alignment(
    encoders: Mapping[str, Encoder], vectors: Mapping[str, NDArray[np.float32]], prompts: list[str]
) -> NDArray[np.float32] | None:
    """Prompt-image alignment of each image, as the indexer stores it; None without CLIP."""
    clip = encoders.get("clip")
    if clip is None or not isinstance(clip, TextImageEncoder):
        return None
    texts = [scoring_text(p) for p in prompts]
    scores = np.full(len(texts), np.nan, dtype=np.float32)
    present = [i for i, text in enumerate(texts) if text]
    if present:
        text_vecs = clip.embed_texts([texts[i] for i in present])
        scores[present] = alignment_scores(vectors["clip"][present], text_vecs)
    return scores


# -- into the catalog -------------------------------------------------------------------------


def store_generated(engine: Engine, request: GenerationRequest, made: Sequence[Made]) -> list[str]:
    """Save ``made`` under ``<catalog>/generated/`` and add them to the catalog; their new ids.

    Each file is written atomically first; the items and their vectors for every space then
    go in in one transaction, so a crash leaves at worst an unreferenced file, never an item
    without its image or vectors. An image the catalog already holds is not added again.
    """
    catalog = engine.catalog
    parent = hashlib.sha256(request.session_id.encode()).hexdigest()[:16]
    news: list[NewItem] = []
    rows: list[Made] = []
    for one in made:
        content_hash = hash_bytes(one.png)
        if catalog.key_for_hash(content_hash) is not None:
            continue  # the backend repeated itself
        item_id = f"gen-{secrets.token_hex(8)}"
        relative = f"{GENERATED_DIR}/{item_id}.png"
        path = catalog.path / relative
        atomic_write_bytes(path, one.png)
        stat = path.stat()
        record = DumpRecord(
            id=item_id,
            image_path=path,
            prompt=one.prompt or None,
            tags=request.tags,
            nsfw_level=request.nsfw_level,
            model_name=one.model,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        provenance = {
            "backend": one.backend,
            "model": one.model,
            "seed": one.seed,
            "prompt": one.prompt,
            # A digest, not the id: the id is the session's bearer credential.
            "parent_session": parent,
            "conditioning": one.conditioning,
        }
        news.append(
            NewItem(
                record=record,
                file=relative,
                content_hash=content_hash,
                file_size=stat.st_size,
                file_mtime_ns=stat.st_mtime_ns,
                width=one.width,
                height=one.height,
                source="generated",
                extra_meta={"generated": provenance},
            )
        )
        rows.append(one)
    if not news:
        return []
    vectors = {space: np.stack([r.vectors[space] for r in rows]) for space in catalog.spaces}
    keys = catalog.add(news, vectors)
    if "clip" in catalog.spaces:  # so that a min_alignment filter does not hide them
        scores = [np.nan if r.alignment is None else r.alignment for r in rows]
        catalog.set_alignment(keys.tolist(), scores)
    return [n.record.id for n in news]


# -- where the work runs ----------------------------------------------------------------------


class _ThreadWorker:
    """Runs the backend in a thread of this process with the engine's own encoders.

    For backends and encoders that exist only in memory (tests, embedding lookalike as a
    library). A job past its time limit is reported failed; its thread finishes in the
    background and its images are dropped.
    """

    def __init__(self, backend: ImageBackend, encoders: Mapping[str, Encoder]) -> None:
        self.backend, self.encoders = backend, encoders
        self._device = ThreadPoolExecutor(1, thread_name_prefix=f"generate-{backend.name}")

    def start(self) -> None:
        self._device.submit(self.backend.load).result()

    def run(self, request: GenerationRequest, timeout: float) -> list[Made]:
        future = self._device.submit(render_and_encode, self.backend, self.encoders, request)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise TimeoutError(f"timed out after {timeout:g} s") from None

    def close(self) -> None:
        self._device.shutdown(wait=False, cancel_futures=True)


class _ProcessWorker:
    """Runs the backend, and a copy of the catalog's encoders, in a child process.

    The child is spawned at a lower CPU priority (``nice``), so neither its CPU work nor the
    GIL ever slows the service's requests, and a backend that crashes or hangs takes only the
    child with it: a job past its time limit kills the child, and the next job starts a new
    one.
    """

    def __init__(
        self,
        backend: ImageBackend,
        catalog_path: Path,
        device: str | None,
        dtype: str,
        nice: int,
    ) -> None:
        self.backend = backend
        self._args = (str(catalog_path), device, dtype, nice)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy torch's threads
        parent, child = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(child, self.backend, *self._args),
            name=f"lookalike-generate-{self.backend.name}",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self._answer(None)  # the child's load: weights, encoders

    def run(self, request: GenerationRequest, timeout: float) -> list[Made]:
        if self._process is None or not self._process.is_alive():
            self.start()
        assert self._conn is not None
        self._conn.send(request)
        made: list[Made] = self._answer(timeout)
        return made

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        self._stop(grace=5.0)

    def _answer(self, timeout: float | None) -> Any:
        assert self._conn is not None
        if not self._conn.poll(timeout):
            self._stop(grace=0.0)
            raise TimeoutError(f"timed out after {timeout:g} s")
        try:
            ok, payload = self._conn.recv()
        except EOFError:
            code = self._process.exitcode if self._process else None
            self._stop(grace=0.0)
            raise RuntimeError(f"the generation process died (exit code {code})") from None
        if not ok:
            raise RuntimeError(payload)
        return payload

    def _stop(self, grace: float) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.join(grace)
            if process.is_alive():
                process.kill()
                process.join(5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _lower_priority(nice: int) -> None:
    """Make this process (and the threads it starts later) yield the CPU to the service.

    On Linux, SCHED_IDLE runs it only on otherwise idle cores: generation slows down under
    load instead of slowing the feed. Elsewhere, or if refused, plain ``nice``.
    """
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, idle, os.sched_param(0))
            return
    with contextlib.suppress(OSError):
        os.nice(nice)


def _child_main(
    conn: Connection,
    backend: ImageBackend,
    catalog_path: str,
    device: str | None,
    dtype: str,
    nice: int,
) -> None:
    """The generation process: load, then answer requests until told to stop (None)."""
    from indexer.build import create_encoders, recorded_specs

    _lower_priority(nice)
    try:
        import torch

        # One CPU thread: generation must leave the service's cores alone (GPU work is
        # unaffected by this).
        torch.set_num_threads(1)
        backend.load()
        encoders = create_encoders(recorded_specs(Path(catalog_path)) or {}, device, dtype)
        for encoder in encoders.values():
            encoder.load()
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which reports it
        conn.send((False, f"{type(exc).__name__}: {exc}"))
        return
    conn.send((True, None))
    while (request := conn.recv()) is not None:
        try:
            conn.send((True, render_and_encode(backend, encoders, request)))
        except Exception as exc:  # noqa: BLE001 - one failed job must not end the process
            conn.send((False, f"{type(exc).__name__}: {exc}"))


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


class GenerationQueue:
    """A bounded job queue with one worker per device, feeding a backend.

    Implements the engine's ``Generator`` protocol. The worker starts with ``start`` (the
    service calls it at start-up) or on the first request; a backend that fails to load marks
    the queue broken and every later request is refused, with the error kept in ``stats`` and
    on the session that asked. ``config.worker`` says where the backend runs: ``process`` (a
    child process with its own copy of the catalog's encoders, the service default) or
    ``thread`` (this process, the engine's encoders).
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
        self._worker: _ThreadWorker | _ProcessWorker | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._last_full_warning = -math.inf
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
            # Cleared before the job exists: a worker that fails at once sets it again.
            previous_error, session.generation_error = session.generation_error, None
            try:
                self._jobs.put_nowait(_Job(session, request, now))
            except queue.Full:  # jobs are added under this lock: only close() can race here
                session.generation_error = previous_error
                self._stats.refused += 1
                return False
            self._pending.add(session.id)
            self._remember(self._last_start, session.id, now)
            self._stats.requested += 1
        self.start(engine)
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
        """Bind to ``engine`` and start the worker, which loads the backend (idempotent)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._engine = engine
            if self.config.worker == "process":
                self._worker = _ProcessWorker(
                    self.backend,
                    engine.catalog.path,
                    self.config.encoder_device,
                    self.config.encoder_dtype,
                    self.config.worker_nice,
                )
            else:
                self._worker = _ThreadWorker(self.backend, engine.encoders)
            self._thread = threading.Thread(
                target=self._run, name=f"generation-{self.backend.name}", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the job at hand; queued jobs are dropped."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        while True:  # make room for the stop marker
            try:
                self._jobs.put_nowait(None)
                break
            except queue.Full:
                self._drop_one()
        thread.join(timeout)

    def wait_ready(self, timeout: float = 300.0) -> bool:
        """Block until the worker has loaded its models (or failed to; see ``last_error``)."""
        return self._started.wait(timeout)

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
        if self._jobs.full():
            if now - self._last_full_warning > 60:  # once a minute, not once a page
                log.warning("generation queue full (%d jobs); requests refused", cfg.max_queued)
                self._last_full_warning = now
            return "queue full"
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
        worker = self._worker
        assert worker is not None
        try:
            worker.start()
        except Exception as exc:  # noqa: BLE001 - a backend that cannot load must not kill us
            self._broken = f"{type(exc).__name__}: {exc}"
            if self._closed:  # the service stopped while the worker was still loading
                log.info("generation worker stopped while loading")
            else:
                log.error("generation backend %s failed to load: %s", self.backend.name, exc)
        self._started.set()
        while True:
            job = self._jobs.get()
            if job is None:
                break
            if self._broken is not None:
                self._finish(job, [], self._broken)
                continue
            self._process(job, worker)
            self._maybe_checkpoint()
        worker.close()
        self._checkpoint()

    def _process(self, job: _Job, worker: _ThreadWorker | _ProcessWorker) -> None:
        engine = self._engine
        assert engine is not None
        started = self._clock()
        try:
            made = worker.run(job.request, self.config.timeout_s)
            ids = store_generated(engine, job.request, made)
        except Exception as exc:  # noqa: BLE001 - logged and surfaced; the service goes on
            error = str(exc) if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            log.warning("generation for session %s… failed: %s", job.session.id[:6], error)
            self._finish(job, [], error)
            return
        elapsed = self._clock() - started
        log.info(
            "generated %d images for session %s… in %.2f s (%s)",
            len(ids),
            job.session.id[:6],
            elapsed,
            self.backend.name,
        )
        self._finish(job, ids, None)

    def _finish(self, job: _Job, ids: list[str], error: str | None) -> None:
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
