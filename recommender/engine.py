"""The facade the service calls: search, feed, feedback, sessions — over one catalog.

A page is built in four steps: retrieve the k nearest unseen items to the steered query in
the session's primary space and in its prompt (``text``) space (metadata filters), re-rank
them with prompt / tag / CLIP similarity against the session's local vocabulary, pick 15 top
matches plus 5 exploration picks, and remember what was served so that the scroll never
repeats. Until feedback, a mute or a write changes what ranked them, the next pages pick
among the same ranked candidates (those still unseen) instead of searching again.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from indexer.build import create_encoders, recorded_specs
from indexer.catalog import (
    Catalog,
    CatalogItem,
    ItemSummary,
    is_generated,
    nsfw_level_name,
)
from indexer.encoders.base import Encoder
from indexer.images import ImageLimits, decode_image, read_embedded_metadata
from indexer.term_column import TermRuns
from indexer.vector_index import IndexPolicy
from indexer.vector_store import StoreConfig
from recommender.api import (
    FeedbackEvent,
    FeedbackResult,
    ImageQuery,
    ItemQuery,
    Neighbour,
    Page,
    PageItem,
    Query,
    SessionInfo,
    StoredFeedback,
)
from recommender.errors import (
    SessionOwnerUnavailableError,
    UnknownItemError,
    UnknownSessionError,
    UnsupportedQueryError,
)
from recommender.explore import ExploreConfig, Pick, make_page
from recommender.feedback import Steerer, SteeringConfig, make_steerer, score_dwell
from recommender.generate import Generator
from recommender.rerank import RerankConfig, prompt_terms, rerank
from recommender.retrieve import Filters, retrieve
from recommender.sessions import FeedbackEvent as StoredEvent
from recommender.sessions import (
    Ranking,
    Served,
    Session,
    SessionConfig,
    SessionOwners,
    SessionStore,
    new_session_id,
)
from recommender.taste import TasteStore
from recommender.terms import TERM_SPACE, term_matrix, term_vector
from recommender.types import Vector, mean_std, unit

log = logging.getLogger(__name__)

# Spaces whose vectors come from images (a text query can only reach these through CLIP).
IMAGE_SPACES = ("visual", "clip")
# Spaces whose steered query both retrieves candidates and scores them (CLIP has its own
# re-rank signal). Steering learns in every space; the prompt space is where a taste for
# *what* is shown (subject, texture, style) is easiest to read when the primary space only
# sees colour and layout (benchmarks/RESULTS.md, "Steering quality").
QUERY_SPACES = ("visual", "text")


@dataclass(frozen=True)
class EngineConfig:
    """Recommendation knobs. ``similarity_floor`` is the cosine to the session's original
    query below which a candidate no longer counts as "near" (for the sparse signal)."""

    k: int = 100
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    similarity_floor: float = 0.35
    upload_limits: ImageLimits = field(
        default_factory=lambda: ImageLimits(max_bytes=20 * 2**20, max_pixels=40_000_000)
    )
    max_page: int = 100
    # A scroll without feedback pages through one re-ranked search while enough of it is
    # unseen (see ``_ranking``); False searches and re-ranks for every page.
    reuse_ranking: bool = True

    @property
    def page_size(self) -> int:
        return self.explore.page_size


def one_blas_thread() -> None:
    """Make BLAS single-threaded in this process (a process that serves pages calls this).

    A page's matrix products are small (a few hundred rows): splitting one over threads costs
    more CPU than it saves, and concurrent requests already keep every core busy. On 2 cores,
    the default strategy's update and Thompson sample took about twice the CPU with OpenBLAS's
    own threads."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class Engine:
    """Recommendation over one catalog. Thread-safe: each session has its own lock.

    With ``owners`` (several serving processes over one catalog), a call for a session that
    another process holds runs there: the session-bound methods forward it first thing.
    """

    def __init__(
        self,
        catalog: Catalog,
        encoders: Mapping[str, Encoder],
        config: EngineConfig | None = None,
        *,
        generator: Generator | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        taste: TasteStore | None = None,
        owners: SessionOwners | None = None,
    ) -> None:
        self.catalog = catalog
        self.encoders = dict(encoders)
        self.config = config or EngineConfig()
        self.generator = generator
        self.taste = taste  # known users' sessions start from their taste (recommender/taste.py)
        self.owners = owners
        self.sessions = SessionStore(
            self.config.sessions,
            clock=clock,
            new_id=owners.new_session_id if owners is not None else new_session_id,
        )
        self.steerer: Steerer = make_steerer(self.config.steering)
        self._seed = np.random.SeedSequence(seed)
        self._clock = clock
        # Creation order of this engine's sessions: with the seed it makes page draws
        # reproducible (session ids are random); entries go when their session is evicted.
        self._serials: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()
        self._next_serial = itertools.count()
        self._serial_lock = threading.Lock()

    @classmethod
    def from_catalog(
        cls,
        path: Path,
        *,
        device: str | None = None,
        dtype: str = "fp32",
        config: EngineConfig | None = None,
        generator: Generator | None = None,
        seed: int | None = None,
        store: StoreConfig | None = None,
        policy: IndexPolicy | None = None,
        owners: SessionOwners | None = None,
    ) -> Engine:
        """Open the catalog at ``path`` with the encoders its manifest records (``store``:
        where its Milvus server is, when it keeps its vectors there)."""
        catalog = Catalog.open(path, store=store, policy=policy)
        specs = recorded_specs(path) or {}
        return cls(
            catalog,
            create_encoders(specs, device, dtype),
            config,
            generator=generator,
            seed=seed,
            taste=TasteStore.for_catalog(path),
            owners=owners,
        )

    # -- description ----------------------------------------------------------------------
    @property
    def spaces(self) -> tuple[str, ...]:
        return self.catalog.spaces

    @property
    def primary_space(self) -> str:
        return "visual" if "visual" in self.spaces else self.spaces[0]

    def load(self) -> None:
        """Load every encoder now (the service calls this at start-up)."""
        for encoder in self.encoders.values():
            encoder.load()

    def ready(self) -> bool:
        return all(encoder.loaded for encoder in self.encoders.values())

    def stats(self) -> dict[str, int]:
        stats = {"items": len(self.catalog), "live_sessions": len(self.sessions)}
        if self.generator is not None:
            stats.update(self.generator.stats())
        return stats

    def close(self) -> None:
        """Stop the generator (it writes the FAISS snapshots it owes) and close the catalog."""
        if self.generator is not None:
            self.generator.close()
        self.catalog.close()

    # -- sessions -------------------------------------------------------------------------
    def create_session(self, user_id: str | None = None) -> str:
        started, session_id = self._start_elsewhere("create_session", user_id)
        if started:
            return str(session_id)
        return self._new_session(user_id).id

    def _new_session(self, user_id: str | None) -> Session:
        session = self.sessions.create(user_id)
        with self._serial_lock:
            self._serials[session] = next(self._next_serial)
        return session

    def session_info(self, session_id: str) -> SessionInfo:
        if (owners := self.elsewhere(session_id)) is not None:
            info: SessionInfo = owners.call(session_id, "session_info", session_id)
            return info
        session = self.sessions.get(session_id)
        with session.lock:
            return SessionInfo(
                session_id=session.id,
                user_id=session.user_id,
                served=session.n_served,
                feedback_events=session.n_feedback,
                terms=session.vocabulary.top_terms(12),
            )

    def mute(self, session_id: str, term: str) -> None:
        """ "Less of this": the term stops pulling the feed and pushes matching items down."""
        if (owners := self.elsewhere(session_id)) is not None:
            owners.call(session_id, "mute", session_id, term)
            return
        session = self.sessions.get(session_id)
        with session.lock:
            session.vocabulary.mute(term)
            session.ranking = None  # muted terms rank lower now

    def delete_session(self, session_id: str) -> None:
        if (owners := self.elsewhere(session_id)) is not None:
            owners.call(session_id, "delete_session", session_id)
            return
        self.sessions.delete(session_id)

    def _start_elsewhere(self, method: str, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """(True, its result) when ``method``, which starts a new session, ran in the other
        serving process the session should live in; (False, None) when it is to run here."""
        owners = self.owners
        home = owners.home_for_new_session() if owners is not None else None
        if owners is None or home is None:
            return False, None
        try:
            return True, owners.call_in(home, method, *args, **kwargs)
        except SessionOwnerUnavailableError:
            log.warning("worker %d did not answer: the new session starts here", home)
            return False, None

    @property
    def searches_in_process(self) -> bool:
        """Whether its k-NN searches run in this process (FAISS), not over a connection to a
        vector database (Milvus)."""
        return self.catalog.store.kind == "faiss"

    def holds_session(self, session_id: str) -> bool:
        """Whether calls for this session run in this process (else they are forwarded to
        the serving process that holds it, and wait on it)."""
        return self.elsewhere(session_id) is None

    def elsewhere(self, session_id: str) -> SessionOwners | None:
        """``owners`` when another serving process holds this session, else None."""
        owners = self.owners
        if owners is None or owners.owns(session_id):
            return None
        return owners

    # -- items ----------------------------------------------------------------------------
    def item(self, image_id: str) -> CatalogItem:
        found = self.catalog.item(image_id)
        if found is None:
            raise UnknownItemError(image_id)
        return found

    def image_path(self, image_id: str) -> Path:
        """Where the item's image bytes are (generated images live under the catalog)."""
        path = Path(self.item(image_id).file)
        return path if path.is_absolute() else self.catalog.path / path

    # -- queries --------------------------------------------------------------------------
    def search(
        self,
        query: Query,
        *,
        session_id: str | None = None,
        filters: Filters | None = None,
        limit: int | None = None,
    ) -> Page:
        """Start (or restart) a session's scroll from ``query`` and return its first page."""
        if session_id is not None and (owners := self.elsewhere(session_id)) is not None:
            page: Page = owners.call(
                session_id, "search", query, session_id=session_id, filters=filters, limit=limit
            )
            return page
        if session_id is None:
            started, page = self._start_elsewhere("search", query, filters=filters, limit=limit)
            if started:
                return page
        vectors, prompt, tags, exclude_id = self._embed_query(query)
        session = self.sessions.get(session_id) if session_id else self._new_session(user_id=None)
        with session.lock:
            self._start(session, vectors, prompt, tags, filters)
            if exclude_id is not None:
                self._mark_seen(session, [exclude_id])
            return self._next_page(session, limit)

    def feed(self, session_id: str, limit: int | None = None) -> Page:
        """The next page of a session's scroll; never repeats an item."""
        if (owners := self.elsewhere(session_id)) is not None:
            page: Page = owners.call(session_id, "feed", session_id, limit)
            return page
        session = self.sessions.get(session_id)
        with session.lock:
            if not session.query:
                return Page(session.id, [], sparse=True, generating=session.pending_generation)
            return self._next_page(session, limit)

    def feedback(self, session_id: str, events: Sequence[FeedbackEvent]) -> FeedbackResult:
        """Store dwell events durably (idempotent by event_id), then steer the session."""
        if (owners := self.elsewhere(session_id)) is not None:
            result: FeedbackResult = owners.call(session_id, "feedback", session_id, events)
            return result
        return self.steer_with(self.store_feedback(session_id, events))

    def store_feedback(self, session_id: str, events: Sequence[FeedbackEvent]) -> StoredFeedback:
        """``feedback``'s first half, for a session held here: commit the events (new event
        ids only) and return them. It waits on the disk; ``steer_with`` does the CPU work, so
        that a server can run each where it costs least."""
        session = self.sessions.get(session_id)
        self._check_known(session, [e.image_id for e in events])
        fresh, duplicates = self.catalog.record_feedback(
            session.id,
            session.user_id,
            [(e.event_id, e.image_id, float(e.dwell_ms)) for e in events],
        )
        return StoredFeedback(session.id, tuple(events[i] for i in fresh), duplicates)

    def _check_known(self, session: Session, image_ids: Sequence[str]) -> None:
        """Refuse a batch with an image neither served to the session nor in the catalog (a
        typo, a guess, junk): none of its events is stored. One served and deleted since
        still counts."""
        unknown = [i for i in dict.fromkeys(image_ids) if not session.is_seen(i)]
        if unknown:
            keys = self.catalog.keys_for_ids(unknown)
            missing = [i for i, key in zip(unknown, keys, strict=True) if key is None]
            if missing:
                raise UnknownItemError(missing[0])

    def steer_with(self, stored: StoredFeedback) -> FeedbackResult:
        """``feedback``'s second half: steer the session with the events just stored (each
        event id once). A session that ended meanwhile keeps its events in the catalog."""
        try:
            session = self.sessions.get(stored.session_id)
        except UnknownSessionError:
            session = None
        if session is not None:
            with session.lock:
                new = [e for e in stored.events if session.accept_event(e.event_id)]
                if new:
                    self._steer(session, new)
        return FeedbackResult(accepted=len(stored.events), duplicates=stored.duplicates)

    def knn(
        self, query: Query | NDArray[np.float32], *, k: int, space: str | None = None
    ) -> list[Neighbour]:
        """Plain nearest neighbours (no session, no re-rank), for clip-retrieval clients."""
        if isinstance(query, np.ndarray):
            target = space or ("clip" if "clip" in self.spaces else self.primary_space)
            raw = np.asarray(query, dtype=np.float64)
            peak = float(np.max(np.abs(raw))) if raw.size else 0.0
            if not (np.isfinite(peak) and peak > 0):  # no direction to search in
                raise UnsupportedQueryError("the embedding must be finite and not all zeros")
            vector = unit(raw / peak)  # scaled first: 1e308s would overflow the norm
            if vector.shape[0] != self.catalog.indexes[target].dim:
                raise UnsupportedQueryError(
                    f"embedding has {vector.shape[0]} dimensions; the {target} space has "
                    f"{self.catalog.indexes[target].dim}"
                )
            vectors = {target: vector}
        else:
            vectors = self._embed_query(query)[0]
            target = space if space in vectors else next(iter(vectors))
        found = retrieve(self.catalog, target, vectors[target], k)
        items = {item.key: item for item in self.catalog.item_summaries(found.keys.tolist())}
        return [
            Neighbour(items[key].id, float(score), items[key].prompt)
            for key, score in zip(found.keys.tolist(), found.scores.tolist(), strict=True)
            if key in items
        ]

    # -- internals: queries -----------------------------------------------------------------
    def _embed_query(
        self, query: Query
    ) -> tuple[dict[str, Vector], str | None, tuple[str, ...], str | None]:
        """Query vectors per space, the query's own prompt and tags, and an id to exclude."""
        if isinstance(query, ItemQuery):
            item = self.item(query.image_id)
            vectors = {space: self.catalog.vectors(space, [item.key])[0] for space in self.spaces}
            if not np.any(vectors.get("text", np.ones(1))):
                del vectors["text"]  # an item without text has no text-space position
            return vectors, item.prompt, item.tags, item.id
        if isinstance(query, ImageQuery):
            image = decode_image(query.data, self.config.upload_limits)
            vectors = {
                space: self.encoders[space].embed_batch([image])[0]
                for space in self.spaces
                if space in IMAGE_SPACES
            }
            embedded = read_embedded_metadata(query.data)
            if embedded.prompt and "text" in self.spaces:
                vectors["text"] = self._embed_text("text", embedded.prompt)
            return vectors, embedded.prompt, (), None
        text = query.text.strip()
        if not text:
            raise UnsupportedQueryError("empty text query")
        vectors = {}
        if "clip" in self.spaces:
            vectors["clip"] = self._embed_text("clip", text)
        if "text" in self.spaces:
            vectors["text"] = self._embed_text("text", text)
        if not vectors:
            raise UnsupportedQueryError("this catalog has no space that can embed text")
        return vectors, text, (), None

    def _embed_text(self, space: str, text: str) -> Vector:
        encoder = self.encoders[space]
        embed = getattr(encoder, "embed_texts", None)  # CLIP's text tower
        vectors = embed([text]) if embed is not None else encoder.embed_batch([text])
        return np.asarray(vectors[0], dtype=np.float32)

    def _start(
        self,
        session: Session,
        vectors: Mapping[str, Vector],
        prompt: str | None,
        tags: Sequence[str],
        filters: Filters | None,
    ) -> None:
        session.q0 = {space: unit(v) for space, v in vectors.items()}
        terms = term_vector(tags, prompt)
        if np.any(terms):  # steering learns which tags and prompt terms the person likes
            session.q0[TERM_SPACE] = terms
        if self.taste is not None:
            self.taste.warm_start(session)  # a known user's taste joins the query
        session.query = dict(session.q0)
        session.steering = {space: self.steerer.init_state(v) for space, v in session.q0.items()}
        session.filters = filters or Filters()
        session.ranking = None
        session.primary = next(
            space for space in (self.primary_space, "clip", "text") if space in vectors
        )
        prompt_vec = vectors.get("text")
        session.vocabulary.add(prompt_vec, tags=tags, terms=prompt_terms(prompt), weight=2.0)

    def _mark_seen(self, session: Session, image_ids: Sequence[str]) -> None:
        session.mark_seen(image_ids)
        for image_id in image_ids:
            key = self.catalog.key_for_id(image_id)
            if key is not None:
                session.seen_keys.add(key)

    # -- internals: pages -------------------------------------------------------------------
    def _next_page(self, session: Session, limit: int | None) -> Page:
        size = min(limit or self.config.page_size, self.config.max_page)
        generated = self._take_generated(session, size)
        page_items = [_page_item(item, score, "top") for item, score in generated]
        now = self._clock()
        session.record_served(
            Served(item.id, item.key, "top", score, now) for item, score in generated
        )
        size -= len(generated)
        if size <= 0:  # a page of new images: nothing to retrieve this time
            return Page(session.id, page_items, sparse=False, generating=session.pending_generation)
        ranking, ranked_pool = self._ranking(session, size)
        # A page picks among the best of the ranking: the top ones and the explore window.
        n = min(max(self.config.explore.explore_to, size), len(ranking))
        window = self._window(session, ranking, ranked_pool, n)
        picks = self._pick(session, window, size)
        picked_keys = [int(window.keys[p.rank]) for p in picks]
        # Rows only for what the page shows: ranking read the candidates' terms from memory.
        summaries = {s.key: s for s in self.catalog.item_summaries(picked_keys)}
        picked = [
            (summaries[key], float(ranking.scores[p.rank]), p.kind)
            for key, p in zip(picked_keys, picks, strict=True)
            if key in summaries  # else deleted meanwhile
        ]
        now = self._clock()
        session.record_served(
            Served(item.id, item.key, kind, score, now) for item, score, kind in picked
        )
        sparse = ranking.sparse
        if sparse and self.generator is not None and not session.generated_inbox:
            session.pending_generation = self.generator.request(session, self)
        page_items += [_page_item(item, score, kind) for item, score, kind in picked]
        return Page(session.id, page_items, sparse=sparse, generating=session.pending_generation)

    def _take_generated(self, session: Session, size: int) -> list[tuple[CatalogItem, float]]:
        """Images generated for this session that it has not seen, still in the catalog and
        allowed by its filters, at most ``size``: they lead its next page."""
        out: list[tuple[CatalogItem, float]] = []
        if not session.generated_inbox:
            return out  # the usual page: no filter mask to build
        mask = self.catalog.allowed_mask(session.filters)
        while session.generated_inbox and len(out) < size:
            item = self.catalog.item(session.generated_inbox.popleft())
            if item is None or item.id in session.seen:
                continue  # deleted meanwhile, or already served
            if mask is not None and not (item.key < len(mask) and mask[item.key]):
                continue
            vector = self.catalog.vectors(session.primary, [item.key])[0]
            out.append((item, float(vector @ session.query[session.primary])))
        return out

    def _query_spaces(self, session: Session) -> list[str]:
        """The primary space, then the other ``QUERY_SPACES`` the session has a query in."""
        others = [s for s in QUERY_SPACES if s != session.primary and s in session.query]
        return [session.primary, *others]

    def _ranking(self, session: Session, size: int) -> tuple[Ranking, _Pool | None]:
        """The session's unseen candidates re-ranked, best first, for a page of ``size``, and
        the pool they were ranked from when they are new.

        A search re-ranks the ``k`` nearest unseen items (at least two pages' worth). While
        nothing that ranked them changes (a scroll without feedback: the query, vocabulary,
        filters and catalog stay put), the next pages take the best unseen of them, as long
        as they fill a page's explore window: re-ranking them again would give the same
        order, so a scroll searches for every third page instead of every page."""
        cfg = self.config
        kept = session.ranking
        if cfg.reuse_ranking and kept is not None and kept.revision == self.catalog.revision:
            left = kept.unseen(session.seen_keys)
            if left.complete or len(left) >= max(cfg.explore.explore_to, 2 * size):
                if left.complete:  # nothing lies beyond: judge what is left
                    left = replace(left, sparse=self._is_sparse(left, size))
                session.ranking = left
                return left, None
        revision = self.catalog.revision
        candidates, complete = self._retrieve(session, max(cfg.k, 2 * size))
        # Terms, not rows: re-ranking needs only these, and a page shows a fifth of the pool.
        terms = self.catalog.term_runs(candidates.keys.tolist())
        candidates.set_vectors(TERM_SPACE, term_matrix(terms))
        ranked = self._rank(session, candidates, terms)
        pool = ranked.pool
        near = pool.vectors(session.primary) @ session.q0[session.primary]
        ranking = Ranking(
            revision,
            pool.keys,
            ranked.scores,
            cosines=pool.scores,
            near=near >= self.config.similarity_floor,
            complete=complete,
            sparse=False,
        )
        session.ranking = replace(ranking, sparse=self._is_sparse(ranking, size))
        return session.ranking, pool

    def _window(
        self,
        session: Session,
        ranking: Ranking,
        pool: _Pool | None,
        n: int,
    ) -> _Pool:
        """The ``n`` best of ``ranking`` with the vectors that exploration scores them in:
        taken from the pool just ranked, else read."""
        if pool is not None:
            return pool.take(np.arange(n))
        window = _Pool(self.catalog, ranking.keys[:n], ranking.cosines[:n])
        if TERM_SPACE in session.steering:
            terms = self.catalog.term_runs(window.keys.tolist())
            window.set_vectors(TERM_SPACE, term_matrix(terms))
        return window

    def _retrieve(self, session: Session, k: int) -> tuple[_Pool, bool]:
        """The ``k`` nearest unseen, allowed items to the steered query in each query space,
        merged, and the ``k`` of them that match it best over all those spaces (re-ranking
        costs grow with the pool); best first, ``scores`` are cosines in the primary space.
        True with them when nothing beyond them qualifies (each search came back short)."""
        seen = session.seen_keys.array()
        found = [
            retrieve(
                self.catalog, space, session.query[space], k, filters=session.filters, seen=seen
            )
            for space in self._query_spaces(session)
        ]
        complete = all(len(c) < k for c in found)
        if len(found) == 1:
            return _Pool(self.catalog, found[0].keys, found[0].scores), complete
        keys = np.unique(np.concatenate([c.keys for c in found]))
        merged = _Pool(self.catalog, keys, np.zeros(len(keys), dtype=np.float32))
        merged.scores = (merged.vectors(session.primary) @ session.query[session.primary]).astype(
            np.float32
        )
        relevance = np.nan_to_num(self._query_similarity(session, merged), nan=-np.inf)
        order = np.argsort(-relevance, kind="stable")[:k]
        return merged.take(order), complete and len(keys) <= k

    def _query_similarity(self, session: Session, candidates: _Pool) -> NDArray[np.float64]:
        """How well each candidate matches the steered query: its cosine per query space,
        standardised over the candidates (spaces' cosine ranges differ), averaged over the
        spaces where it has a vector. float64 (n,)."""
        spaces = self._query_spaces(session)
        if TERM_SPACE in session.query and candidates.has(TERM_SPACE):
            spaces.append(TERM_SPACE)
        if len(spaces) == 1 or not len(candidates):
            return candidates.scores.astype(np.float64)
        sims = []
        for space in spaces:
            vecs = candidates.vectors(space)
            sim = (vecs @ session.query[space]).astype(np.float64)
            sim[~candidates.present(space)] = np.nan  # no prompt: no text-space position
            ok = np.isfinite(sim)
            if ok.any():
                mean, std = mean_std(sim[ok])
                sims.append((sim - mean) / max(std, self.config.rerank.min_std))
        stacked = np.stack(sims)
        counts = np.isfinite(stacked).sum(axis=0)
        total = np.nansum(stacked, axis=0)
        return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)

    def _rank(self, session: Session, candidates: _Pool, terms: TermRuns) -> _Ranked:
        text_vecs = candidates.vectors("text") if "text" in self.spaces else None
        clip_sim = None
        if "clip" in self.spaces and "clip" in session.query and session.primary != "clip":
            clip_sim = candidates.vectors("clip") @ session.query["clip"]
        result = rerank(
            self._query_similarity(session, candidates),
            session.vocabulary,
            text_vecs=text_vecs,
            terms=terms,
            clip_sim=clip_sim,
            config=self.config.rerank,
        )
        order = result.order
        return _Ranked(pool=candidates.take(order), scores=result.scores[order])

    def _pick(self, session: Session, window: _Pool, size: int) -> list[Pick]:
        explore = self.config.explore
        if size != explore.page_size:  # scale the 15 + 5 split to the requested page size
            n_explore = round(size * explore.n_explore / max(explore.page_size, 1))
            explore = ExploreConfig(
                n_top=size - n_explore,
                n_explore=n_explore,
                explore_from=explore.explore_from,
                explore_to=explore.explore_to,
                interleave=explore.interleave,
            )
        rng = self._rng(session)
        scores = self._explore_scores(session, window, rng)
        picks = make_page(len(window), explore, rng, scores)
        if len(picks) < size:  # large pages outgrow the explore window: fill with top ranks
            used = {p.rank for p in picks}
            spare = [r for r in range(len(window)) if r not in used]
            picks += [Pick(r, "top") for r in spare[: size - len(picks)]]
        return picks

    def _explore_scores(
        self, session: Session, pool: _Pool, rng: np.random.Generator
    ) -> NDArray[np.float32] | None:
        """The steerer's exploration scores (e.g. Thompson samples) of the candidates in the
        primary and ``terms`` spaces, standardised and summed; None for uniform picks."""
        if not len(pool):
            return None
        total: NDArray[np.floating] | None = None
        for space in (session.primary, TERM_SPACE):
            state = session.steering.get(space)
            if state is None or (space == TERM_SPACE and not pool.has(space)):
                continue
            got = self.steerer.explore_scores(state, pool.vectors(space), rng)
            if got is None:
                return None
            mean, std = mean_std(got)
            z = (got - mean) / max(std, 1e-9)
            total = z if total is None else total + z
        return None if total is None else total.astype(np.float32)

    def _is_sparse(self, ranking: Ranking, size: int) -> bool:
        """Fewer than a page of unseen candidates near the *original* query would be left
        after this page (a page taken from an earlier search keeps that search's verdict:
        what lies beyond its candidates is not known without searching again)."""
        if len(ranking) < size:
            return True
        near = int(np.count_nonzero(ranking.near))
        # The steered query moves away from q0; also count what is near where it points now.
        near_now = int(np.count_nonzero(ranking.cosines >= self.config.similarity_floor))
        left_after_this_page = max(near, near_now) - size
        return left_after_this_page < size

    def _rng(self, session: Session) -> np.random.Generator:
        """A per-page generator: reproducible for a seeded engine, fresh for every page."""
        root = self._seed.entropy if isinstance(self._seed.entropy, int) else 0
        serial = self._serials.get(session)
        who = serial if serial is not None else zlib.crc32(session.id.encode())
        entropy = [root, session.n_served, who]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    # -- internals: feedback ----------------------------------------------------------------
    def _steer(self, session: Session, events: Sequence[FeedbackEvent]) -> None:
        # In the order they were served (dwell statistics and histories run oldest first).
        keys = self.catalog.keys_for_ids([e.image_id for e in events])
        order = np.argsort(_served_positions(session, keys), kind="stable").tolist()
        events, keys = [events[i] for i in order], [keys[i] for i in order]
        known = [(e, k) for e, k in zip(events, keys, strict=True) if k is not None]
        scores = score_dwell(
            session.dwell, [e.dwell_ms for e in events], self.config.steering.dwell
        )
        now = self._clock()
        session.record_feedback(
            [
                StoredEvent(-1 if key is None else key, event.dwell_ms, score, now)
                for event, key, score in zip(events, keys, scores.tolist(), strict=True)
            ]
        )
        if not known:
            return
        known_scores = np.array(
            [s for s, k in zip(scores.tolist(), keys, strict=True) if k is not None],
            dtype=np.float32,
        )
        known_keys = [k for _, k in known]
        # The vocabulary weighs tags and prompt terms apart: summaries, which the page just
        # served and so are cached (full rows would be read anew).
        by_key = {item.key: item for item in self.catalog.item_summaries(known_keys)}
        read: dict[str, NDArray[np.float32]] = {}
        for space, state in session.steering.items():
            if space == TERM_SPACE:
                read[space] = term_matrix(self.catalog.term_runs(known_keys))
            else:
                read[space] = self.catalog.vectors(space, known_keys)
            session.query[space] = self.steerer.update(state, read[space], known_scores)
        if "text" in self.spaces and "text" not in read:
            read["text"] = self.catalog.vectors("text", known_keys)
        self._learn_vocabulary(session, known_keys, known_scores, by_key, read.get("text"))
        session.ranking = None  # ranked for the query before

    def _learn_vocabulary(
        self,
        session: Session,
        keys: Sequence[int],
        scores: NDArray[np.float32],
        items: Mapping[int, ItemSummary],
        text_vecs: NDArray[np.float32] | None,
    ) -> None:
        """Add the dwelt-on items' tags, prompt terms and prompt vectors (``text_vecs``, rows
        in the order of ``keys``; None without a text space) to the session's vocabulary."""
        session.vocabulary.decay()
        for i, key in enumerate(keys):
            item, weight = items.get(key), float(scores[i])
            if item is None or weight <= 0:
                continue
            prompt_vec = text_vecs[i] if text_vecs is not None and np.any(text_vecs[i]) else None
            session.vocabulary.add(
                prompt_vec, tags=item.tags, terms=item.prompt_terms, weight=weight
            )


def _served_positions(session: Session, keys: Sequence[int | None]) -> NDArray[np.int64]:
    """Where each key was last served among the session's kept records; past their end when
    it never was (or is None: not in the catalog)."""
    served = session.served["key"]
    wanted = np.array([-1 if key is None else key for key in keys], dtype=np.int64)
    positions = np.full(len(wanted), len(served), dtype=np.int64)
    if len(served):
        order = np.argsort(served, kind="stable")  # equal keys stay in the order served
        ranked = served[order]
        last = np.searchsorted(ranked, wanted, side="right") - 1  # the latest of equal keys
        hit = (last >= 0) & (ranked[np.maximum(last, 0)] == wanted)
        positions[hit] = order[last[hit]]
    return positions


class _Pool:
    """Candidate keys with their primary-space cosines (``scores``), best first.

    A page reads each space's vectors of its candidates from the catalog once, on first use;
    ``take`` keeps the rows already read (and which are zero) for the subset or new order it
    selects.
    """

    def __init__(
        self,
        catalog: Catalog,
        keys: NDArray[np.int64],
        scores: NDArray[np.float32],
        vectors: dict[str, NDArray[np.float32]] | None = None,
        present: dict[str, NDArray[np.bool_]] | None = None,
    ) -> None:
        self._catalog = catalog
        self.keys = keys
        self.scores = scores
        self._vectors = vectors or {}
        self._present = present or {}

    def __len__(self) -> int:
        return len(self.keys)

    def vectors(self, space: str) -> NDArray[np.float32]:
        """float32 (len(self), dim) vectors of the candidates in ``space``."""
        if space not in self._vectors:
            self._vectors[space] = self._catalog.vectors(space, self.keys)
        return self._vectors[space]

    def present(self, space: str) -> NDArray[np.bool_]:
        """Which candidates have a vector in ``space`` (a zero row: none, e.g. no prompt)."""
        if space not in self._present:
            self._present[space] = np.any(self.vectors(space), axis=1)
        return self._present[space]

    def has(self, space: str) -> bool:
        return space in self._vectors

    def set_vectors(self, space: str, rows: NDArray[np.float32]) -> None:
        """Vectors of a space the catalog does not store (the ``terms`` space)."""
        self._vectors[space] = rows
        self._present.pop(space, None)

    def take(self, index: NDArray[np.int64] | NDArray[np.bool_]) -> _Pool:
        """The candidates selected by ``index`` (positions or a mask), in that order."""
        return _Pool(
            self._catalog,
            self.keys[index],
            self.scores[index],
            {space: rows[index] for space, rows in self._vectors.items()},
            {space: mask[index] for space, mask in self._present.items()},
        )


@dataclass(frozen=True)
class _Ranked:
    """Candidates after re-ranking, best first: their pool and their fused scores."""

    pool: _Pool
    scores: NDArray[np.float32]


def _page_item(item: CatalogItem | ItemSummary, score: float, pick: str) -> PageItem:
    return PageItem(
        id=item.id,
        score=round(score, 5),
        pick="explore" if pick == "explore" else "top",
        prompt=item.prompt,
        tags=item.tags,
        width=item.width,
        height=item.height,
        nsfw_level=nsfw_level_name(item.nsfw_level),
        generated=is_generated(item.source),
    )
