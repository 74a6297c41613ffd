"""Collaborative taste: user taste vectors fitted from dwell, in the catalog's embedding spaces.

**Model.** Users ``u`` and items ``j``. A user's dwell on an item (summed over events) becomes a
preference ``p_uj`` in {0, 1} and a confidence ``c_uj`` >= 1, implicit-feedback style (Hu,
Koren & Volinsky 2008): ``z`` is the user's log dwell standardised robustly over their own
events (median / MAD; dwell is heavy-tailed and people read at different speeds), ``p = [z >
0]`` and ``c = 1 + alpha * |z|`` (|z| clipped at 3), so a long look is a confident "yes" and a
quick skip a confident "no". Every unobserved pair counts as ``p = 0`` with ``c = 1``. We
minimise

    sum_uj c_uj (p_uj - x_u . v_j)^2  +  lam * sum_u |x_u|^2  +  mu * sum_j |v_j - f_j|^2

by alternating least squares. Each row's subproblem is a ridge regression with a closed form;
the unobserved pairs enter it through one Gram matrix (``Y^T Y``) shared by all rows, and the
observed ones through scipy.sparse matrices. Rows are solved together in padded batches,
exactly (batched LU, O(r^3) a row) or, by default, with a few conjugate-gradient steps
warm-started from the previous sweep (as the ``implicit`` library does; O(events x r) a row),
so a sweep costs O(nnz r + (users + items) r^2) and scales to 100k users x 1M items.

**Anchor.** ``f_j`` is the item's embedding in one space, projected on its top-``rank``
principal directions (a basis ``P``); each space gets its own model over the same
interactions. (One joint model over the spaces concatenated did worse: the cleanest space
explains the preferences and leaves the other spaces' blocks of ``x_u`` near noise; the
planted test in tests/test_taste.py shows it.) We use the full anchor ``mu |v_j - f_j|^2``
rather than the scalar ``(f_j . v_j - 1)^2``: the scalar one pins each item factor along a
single direction and leaves the other ``rank - 1`` free to drift, so ``x_u . f_j`` would stop
predicting ``x_u . v_j`` and user factors would leave the image space. With the full anchor
every direction of ``v_j`` is tied to ``f_j``: items nobody saw keep (a shrunk copy of) their
embedding, ``x_u . f_j`` ranks images as the model does, and ``P x_u`` is a query vector that
retrieval (FAISS inner product) and generation conditioning (the ``clip`` space) can use as it
is. It also keeps each solve a well-conditioned ridge (``+ mu I``) with a closed form.

**Use.** A new session of a known user starts from the query blended with the user's taste
(``TasteModel.blend``): each space's query and taste are scaled so that their scores have unit
spread over the catalog, then mixed ``(1 - blend) : blend``. A user with fewer than
``min_events`` items borrows from the ``neighbours`` most similar established users (cosine of
factors), weighted ``n : borrow``. The model is saved as ``taste.npz`` in the catalog.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from numpy.typing import NDArray

from indexer.catalog import Catalog
from indexer.encoders.base import Encoder
from indexer.storage import atomic_write
from recommender.errors import RecommenderError
from recommender.types import Vector, unit

if TYPE_CHECKING:
    from recommender.engine import Engine
    from recommender.sessions import Session

log = logging.getLogger(__name__)

TASTE_FILE = "taste.npz"
FORMAT_VERSION = 1
_Z_CLIP = 3.0
_MAD_TO_STD = 1.4826
_MIN_SCALE = 0.25  # floor of a user's log-dwell spread (a user who always looks alike)

Factors = NDArray[np.float32]
"""float32 (rows, rank): user or item factors."""


class TasteError(RecommenderError):
    """Taste cannot be fitted or used (no user feedback, no model)."""


class TasteNotFittedError(TasteError):
    """The catalog has no taste model yet."""


class UnknownUserError(TasteError):
    """The taste model knows no user with this id."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"no taste is known for user {user_id!r} (no feedback at the last fit)")
        self.user_id = user_id


@dataclass(frozen=True)
class TasteConfig:
    """Knobs of the fit and of its use.

    Fit: ``rank`` (factor dimension; the embeddings' top principal directions), ``lam`` (L2 on
    user factors), ``mu`` (anchor of item factors to embeddings), ``alpha`` (confidence per
    unit of standardised dwell), ``iterations`` (ALS sweeps), ``cg_steps`` (conjugate-gradient
    steps per row and sweep, warm-started; 0: exact solves), ``track_loss`` (the objective
    after every sweep, not only the last), ``spaces`` (None: every space of the catalog).

    Use: ``blend`` (share of the taste in a warm-started query), ``min_events``,
    ``neighbours`` and ``borrow`` (a user with fewer items than ``min_events`` is mixed with
    the mean of its ``neighbours`` nearest established users, weights ``n : borrow``);
    ``rerank_weight`` (the taste's text vector joins the session's re-rank vocabulary with
    this weight; a query's own prompt has 2) and ``rerank_terms`` (how many of the nearest
    vocabulary terms join it too).
    """

    rank: int = 64
    lam: float = 1.0
    mu: float = 10.0
    alpha: float = 10.0
    iterations: int = 8
    cg_steps: int = 3
    track_loss: bool = False
    spaces: tuple[str, ...] | None = None
    blend: float = 0.5
    rerank_weight: float = 2.0
    rerank_terms: int = 0
    min_events: int = 10
    neighbours: int = 20
    borrow: float = 10.0
    pca_sample: int = 20_000
    vocab_tags: int = 500
    vocab_terms: int = 1_500
    vocab_items: int = 20_000
    chunk_elements: int = 1 << 23
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.iterations < 1:
            raise ValueError("need rank >= 1 and iterations >= 1")
        if self.lam <= 0 or self.mu <= 0 or self.alpha < 0:
            raise ValueError("need lam > 0, mu > 0 and alpha >= 0")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError("blend must be in [0, 1]")


# --------------------------------------------------------------------------- interactions


@dataclass(frozen=True)
class Interactions:
    """Observed pairs as two CSR matrices (users x items) with one sparsity pattern:
    ``weight`` = c - 1 and ``target`` = c * p; ``n_items`` = distinct items per user."""

    weight: sp.csr_matrix
    target: sp.csr_matrix
    n_items: NDArray[np.int32]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.weight.shape
        return int(rows), int(cols)

    def transpose(self) -> Interactions:
        counts = np.diff(self.weight.tocsc().indptr).astype(np.int32)
        return Interactions(self.weight.T.tocsr(), self.target.T.tocsr(), counts)


def interactions(
    user_index: NDArray[np.int64],
    item_index: NDArray[np.int64],
    dwell_ms: NDArray[np.float64],
    shape: tuple[int, int],
    alpha: float,
) -> Interactions:
    """Events -> preference and confidence (see the module docstring). Repeated (user, item)
    events are summed first; ``shape`` is (users, items)."""
    summed = sp.coo_matrix(
        (np.maximum(np.asarray(dwell_ms, dtype=np.float64), 1.0), (user_index, item_index)),
        shape=shape,
    ).tocsr()
    summed.sum_duplicates()
    rows = np.repeat(np.arange(shape[0]), np.diff(summed.indptr))
    z = standardise_per_row(np.log(summed.data), rows, shape[0])
    confidence = 1.0 + alpha * np.abs(z)
    preference = (z > 0).astype(np.float64)
    weight = sp.csr_matrix((confidence - 1.0, summed.indices, summed.indptr), shape=shape)
    target = sp.csr_matrix((confidence * preference, summed.indices, summed.indptr), shape=shape)
    return Interactions(weight, target, np.diff(summed.indptr).astype(np.int32))


def standardise_per_row(
    values: NDArray[np.float64], rows: NDArray[np.int64], n_rows: int, min_count: int = 5
) -> NDArray[np.float64]:
    """Robust z-scores of ``values`` within each row: (v - median) / (1.4826 MAD), the spread
    floored; rows with fewer than ``min_count`` values use the pooled median and spread.
    Clipped to +-3. float64, same order as ``values``."""
    if not len(values):
        return np.zeros(0)
    centre, counts = _row_median(values, rows, n_rows)
    deviation = np.abs(values - centre[rows])
    mad, _ = _row_median(deviation, rows, n_rows)
    scale = np.maximum(_MAD_TO_STD * mad, _MIN_SCALE)
    pooled_centre = float(np.median(values))
    pooled_scale = max(_MAD_TO_STD * float(np.median(np.abs(values - pooled_centre))), _MIN_SCALE)
    few = counts < min_count
    centre[few], scale[few] = pooled_centre, pooled_scale
    return np.clip((values - centre[rows]) / scale[rows], -_Z_CLIP, _Z_CLIP)


def _row_median(
    values: NDArray[np.float64], rows: NDArray[np.int64], n_rows: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Per-row medians (0 for empty rows) and per-row counts."""
    order = np.lexsort((values, rows))
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    medians = np.zeros(n_rows)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    medians[has] = 0.5 * (values[order[lo]] + values[order[hi]])
    return medians, counts


# --------------------------------------------------------------------------- ALS


@dataclass(frozen=True)
class AlsResult:
    """Fitted factors: ``users`` (m, r), ``items`` (n, r) float32; the objective after each
    sweep (``track_loss``) or after the last; seconds spent."""

    users: Factors
    items: Factors
    loss: list[float]
    seconds: float


def fit_als(data: Interactions, anchors: Factors, config: TasteConfig) -> AlsResult:
    """Weighted ALS with item factors anchored to ``anchors`` (n, r); see the module docstring.

    Starts from item factors = anchors, then alternates user and item solves.
    """
    started = time.perf_counter()
    by_item = data.transpose()
    items = np.asarray(anchors, dtype=np.float32).copy()
    users = np.zeros((data.shape[0], items.shape[1]), dtype=np.float32)
    steps, chunk = config.cg_steps, config.chunk_elements
    losses = []
    for sweep in range(config.iterations):
        users = solve_rows(data, items, config.lam, None, users, steps, chunk)
        items = solve_rows(by_item, users, config.mu, anchors, items, steps, chunk)
        if config.track_loss or sweep == config.iterations - 1:
            losses.append(objective(data, users, items, anchors, config))
            log.debug("ALS sweep %d: objective %.6g", sweep + 1, losses[-1])
    return AlsResult(users, items, losses, time.perf_counter() - started)


def solve_rows(
    data: Interactions,
    other: Factors,
    reg: float,
    prior: Factors | None,
    start: Factors | None = None,
    cg_steps: int = 0,
    chunk_elements: int = 1 << 23,
) -> Factors:
    """Each row's minimiser given the other side's factors ``other`` (cols, r):

        (O^T O + O^T diag(c - 1) O + reg I) x = O^T (c * p) + reg * prior

    Rows without observations share one factorised matrix (exact). The others go in batches
    of rows sorted by length, padded to the longest of their batch (at most
    ``chunk_elements`` padded values): ``cg_steps`` = 0 solves each exactly (batched LU of its
    r x r matrix); else that many conjugate-gradient steps from ``start`` (the previous
    factors), which never raise a row's objective and cost O(events x r) instead of O(r^3)
    per row. float32 (rows, r).
    """
    n_rows, rank = data.shape[0], other.shape[1]
    base = gram(other) + reg * np.eye(rank)
    rhs = np.asarray(data.target @ other, dtype=np.float32)
    if prior is not None:
        rhs += np.float32(reg) * prior
    out = np.empty((n_rows, rank), dtype=np.float32)
    counts = np.diff(data.weight.indptr)
    cold = np.flatnonzero(counts == 0)
    if len(cold):
        out[cold] = scipy.linalg.cho_solve(scipy.linalg.cho_factor(base), rhs[cold].T).T
    active = np.flatnonzero(counts > 0)
    order = active[np.argsort(counts[active], kind="stable")]
    # exact solves hold an r x r matrix per row; CG only the padded rows
    max_rows = max(1, chunk_elements // (rank * rank)) if cg_steps == 0 else len(order)
    base32 = base.astype(np.float32)
    begin = 0
    while begin < len(order):
        stop = _chunk_end(counts, order, begin, chunk_elements // rank, max_rows)
        rows = order[begin:stop]
        padded = _padded_rows(data.weight, rows, counts[rows], other)
        if cg_steps == 0:
            grams = np.matmul(padded.transpose(0, 2, 1), padded).astype(np.float64) + base
            out[rows] = np.linalg.solve(grams, rhs[rows][..., None])[..., 0]
        else:
            x0 = start[rows] if start is not None else np.zeros((len(rows), rank), np.float32)
            out[rows] = _conjugate_gradient(padded, base32, rhs[rows], x0, cg_steps)
        begin = stop
    return out


def _conjugate_gradient(
    padded: NDArray[np.float32],
    base: NDArray[np.float32],
    rhs: NDArray[np.float32],
    x: NDArray[np.float32],
    steps: int,
) -> NDArray[np.float32]:
    """``steps`` CG iterations on (base + U^T U) x = rhs for each row, U = ``padded`` (R, L, r)."""

    def times(v: NDArray[np.float32]) -> NDArray[np.float32]:
        projected = np.einsum("blr,br->bl", padded, v)
        return np.asarray(v @ base + np.einsum("blr,bl->br", padded, projected))

    x = x.astype(np.float32, copy=True)
    residual = rhs - times(x)
    direction = residual.copy()
    norm = np.einsum("br,br->b", residual, residual)
    tiny = np.float32(1e-30)
    for _ in range(steps):
        moved = times(direction)
        step = norm / np.maximum(np.einsum("br,br->b", direction, moved), tiny)
        x += step[:, None] * direction
        residual -= step[:, None] * moved
        new_norm = np.einsum("br,br->b", residual, residual)
        direction = residual + (new_norm / np.maximum(norm, tiny))[:, None] * direction
        norm = new_norm
    return x


def gram(x: NDArray[np.floating], batch: int = 65_536) -> NDArray[np.float64]:
    """x^T x, accumulated in float64 over row batches (float32 products within a batch)."""
    out = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(x), batch):
        block = x[start : start + batch]
        out += block.T @ block
    return out


def _chunk_end(
    counts: NDArray[np.intp], order: NDArray[np.intp], start: int, budget: int, max_rows: int
) -> int:
    """End of the batch that starts at ``start``: rows are sorted by length, so a batch's
    padded size is its row count times the length of its last row."""
    stop = min(start + max_rows, len(order))
    while stop > start + 1 and (stop - start) * int(counts[order[stop - 1]]) > budget:
        stop = start + max(1, (stop - start) // 2)
    return stop


def _padded_rows(
    weight: sp.csr_matrix, rows: NDArray[np.intp], counts: NDArray[np.intp], other: Factors
) -> NDArray[np.float32]:
    """sqrt(w_ij) o_j for the entries of each of ``rows``, zero-padded: float32 (R, L, r).
    ``U^T U`` of a row's block is its sum_j w_ij o_j o_j^T."""
    length, rank = int(counts.max()), other.shape[1]
    total = int(counts.sum())
    row_of = np.repeat(np.arange(len(rows)), counts)
    position = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    entry = np.repeat(weight.indptr[rows], counts) + position
    padded = np.zeros((len(rows), length, rank), dtype=np.float32)
    scale = np.sqrt(weight.data[entry]).astype(np.float32)
    padded[row_of, position] = other[weight.indices[entry]] * scale[:, None]
    return padded


def objective(
    data: Interactions, users: Factors, items: Factors, anchors: Factors, config: TasteConfig
) -> float:
    """The fitted objective (module docstring), computed without touching unobserved pairs:
    sum over all pairs of s^2 is trace(U^T U V^T V); observed pairs add c (p - s)^2 - s^2."""
    everything = float(np.sum(gram(users) * gram(items)))
    weight, target = data.weight, data.target  # one sparsity pattern, entry for entry
    rows = np.repeat(np.arange(weight.shape[0]), np.diff(weight.indptr))
    observed = 0.0
    for start in range(0, weight.nnz, 1 << 20):  # bounded memory: nnz x rank at a time
        part = slice(start, start + (1 << 20))
        s = np.einsum("ij,ij->i", users[rows[part]], items[weight.indices[part]]).astype(np.float64)
        confidence = weight.data[part] + 1.0
        preference = target.data[part] / confidence
        observed += float(np.sum(confidence * (preference - s) ** 2 - s**2))
    regular = config.lam * float(np.einsum("ij,ij->", users, users, dtype=np.float64))
    drift = items - anchors
    anchor = config.mu * float(np.einsum("ij,ij->", drift, drift, dtype=np.float64))
    return everything + observed + regular + anchor


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class SpaceBasis:
    """How one space's item embeddings become anchors: projected on ``basis`` (d, r), whose
    columns are orthonormal. ``covariance`` (d, d) is the items' covariance in the space (to
    blend queries at comparable scales)."""

    basis: NDArray[np.float32]
    covariance: NDArray[np.float32]

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


def fit_basis(sample: NDArray[np.float32], rank: int) -> SpaceBasis:
    """Top-``rank`` principal directions (uncentred: they keep dot products best) of a sample
    of one space's item embeddings (n, d); the identity when ``rank`` >= d."""
    x = sample.astype(np.float64)
    width = x.shape[1]
    if rank >= width:
        basis = np.eye(width)
    else:
        values, vectors = np.linalg.eigh(x.T @ x / max(len(x), 1))
        basis = vectors[:, np.argsort(values)[::-1][:rank]]
    covariance = np.cov(x, rowvar=False) if len(x) > 1 else np.eye(width)
    return SpaceBasis(basis.astype(np.float32), covariance.astype(np.float32))


def space_anchors(
    catalog: Catalog, space: str, keys: NDArray[np.int64], config: TasteConfig
) -> tuple[SpaceBasis, Factors]:
    """The basis of ``space`` (from a sample of items) and every item's anchor (n, r), read
    from the catalog in batches."""
    rng = np.random.default_rng(config.seed)
    sample_keys = np.sort(rng.choice(keys, size=min(config.pca_sample, len(keys)), replace=False))
    basis = fit_basis(catalog.vectors(space, sample_keys), config.rank)
    anchors = np.concatenate(
        [
            catalog.vectors(space, keys[start : start + 50_000]) @ basis.basis
            for start in range(0, len(keys), 50_000)
        ]
    )
    return basis, anchors.astype(np.float32)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class UserTaste:
    """A user's taste: per space a unit vector (float32 (d,)), the items behind it, and how
    many neighbours it borrowed from."""

    user_id: str
    vectors: dict[str, Vector]
    events: int
    borrowed: int


@dataclass
class TasteModel:
    """Fitted user factors and what is needed to use them (see the module docstring).

    ``users`` (m,) ids; per space a ``bases[space]`` and user ``factors[space]`` float32
    (m, r); ``n_items`` (m,) items each user has feedback on; ``vocab_*``: terms and tags (V,)
    with their text-space vectors (V, d).
    """

    config: TasteConfig
    bases: dict[str, SpaceBasis]
    users: NDArray[np.str_]
    factors: dict[str, Factors]
    n_items: NDArray[np.int32]
    vocab_terms: NDArray[np.str_] = field(default_factory=lambda: np.zeros(0, dtype=str))
    vocab_kinds: NDArray[np.str_] = field(default_factory=lambda: np.zeros(0, dtype=str))
    vocab_vecs: NDArray[np.float32] = field(
        default_factory=lambda: np.zeros((0, 0), dtype=np.float32)
    )
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._row = {str(user): i for i, user in enumerate(self.users.tolist())}
        self._unit = {space: _unit_rows(f) for space, f in self.factors.items()}
        # who resembles whom: all spaces' unit factors side by side
        self._profile = _unit_rows(np.concatenate(list(self._unit.values()), axis=1))
        self._established = np.flatnonzero(self.n_items >= self.config.min_events)

    @property
    def spaces(self) -> tuple[str, ...]:
        return tuple(self.factors)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._row

    def __len__(self) -> int:
        return len(self.users)

    def user_factors(self, user_id: str) -> tuple[dict[str, NDArray[np.float32]], int]:
        """The unit factors (per space) a session starts from, after borrowing; and how many
        neighbours were mixed in."""
        row = self._row.get(user_id)
        if row is None:
            raise UnknownUserError(user_id)
        own = {space: u[row] for space, u in self._unit.items()}
        n = int(self.n_items[row])
        candidates = self._established[self._established != row]
        k = min(self.config.neighbours, len(candidates))
        if n >= self.config.min_events or k == 0:
            return own, 0
        sims = self._profile[candidates] @ self._profile[row]
        top = np.argpartition(-sims, k - 1)[:k]
        weights = np.maximum(sims[top], 0.0)
        if weights.sum() <= 0:
            return own, 0
        mixed = {}
        for space, u in self._unit.items():
            borrowed = unit(weights @ u[candidates[top]])
            mixed[space] = unit(n * own[space] + self.config.borrow * borrowed)
        return mixed, int(np.count_nonzero(weights))

    def taste(self, user_id: str) -> UserTaste:
        """The user's taste per space (unit vectors in each space's embedding space)."""
        factors, borrowed = self.user_factors(user_id)
        vectors = {
            space: unit(self.bases[space].basis @ factor.astype(np.float32))
            for space, factor in factors.items()
        }
        return UserTaste(user_id, vectors, int(self.n_items[self._row[user_id]]), borrowed)

    def blend(self, query: Mapping[str, Vector], taste: UserTaste) -> dict[str, Vector]:
        """The query (unit per space) mixed with the taste, ``(1 - blend) : blend``, each
        scaled to unit score spread over the catalog's items; spaces the query lacks get the
        taste alone."""
        out = dict(query)
        share = self.config.blend
        for space, liked in taste.vectors.items():
            if not np.any(liked):
                continue
            asked = query.get(space)
            if asked is None or not np.any(asked):
                out[space] = liked
                continue
            cov = self.bases[space].covariance
            mixed = (1 - share) * asked / _spread(cov, asked) + share * liked / _spread(cov, liked)
            out[space] = unit(mixed, fallback=asked)
        return out

    def nearest_terms(self, taste: UserTaste, n: int) -> list[tuple[str, str, float]]:
        """The ``n`` vocabulary entries nearest the taste's text-space vector:
        (term, kind "tag" | "term", cosine), best first."""
        text = taste.vectors.get("text")
        if text is None or not len(self.vocab_terms) or not np.any(text):
            return []
        sims = self.vocab_vecs @ text
        top = np.argsort(-sims, kind="stable")[:n]
        return [(str(self.vocab_terms[i]), str(self.vocab_kinds[i]), float(sims[i])) for i in top]

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the model atomically (``taste.npz`` under a catalog)."""
        arrays: dict[str, Any] = {
            "format_version": np.array(FORMAT_VERSION),
            "config": np.array(json.dumps(asdict(self.config))),
            "info": np.array(json.dumps(self.info, default=str)),
            "spaces": np.array(self.spaces),
            "users": self.users,
            "n_items": self.n_items,
            "vocab_terms": self.vocab_terms,
            "vocab_kinds": self.vocab_kinds,
            "vocab_vecs": self.vocab_vecs,
        }
        for space in self.spaces:
            arrays[f"basis_{space}"] = self.bases[space].basis
            arrays[f"cov_{space}"] = self.bases[space].covariance
            arrays[f"factors_{space}"] = self.factors[space]

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> TasteModel:
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format_version"]) != FORMAT_VERSION:
                    raise TasteError(
                        f"{path} is taste format {int(data['format_version'])}; this lookalike "
                        f"reads {FORMAT_VERSION}. Fit again with `lookalike taste fit`."
                    )
                saved = json.loads(str(data["config"]))
                known = TasteConfig.__dataclass_fields__  # knobs added or dropped since: defaults
                settings = {k: v for k, v in saved.items() if k in known}
                if settings.get("spaces"):
                    settings["spaces"] = tuple(settings["spaces"])
                spaces = [str(s) for s in data["spaces"].tolist()]
                return cls(
                    TasteConfig(**settings),
                    {s: SpaceBasis(data[f"basis_{s}"], data[f"cov_{s}"]) for s in spaces},
                    data["users"],
                    {s: data[f"factors_{s}"] for s in spaces},
                    data["n_items"],
                    data["vocab_terms"],
                    data["vocab_kinds"],
                    data["vocab_vecs"],
                    json.loads(str(data["info"])),
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TasteError(f"Cannot read the taste model {path}: {exc}") from exc


def _unit_rows(x: NDArray[np.float32]) -> NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _spread(cov: NDArray[np.float32], v: Vector) -> float:
    """Standard deviation of ``v . f`` over the items (covariance ``cov``)."""
    return max(math.sqrt(max(float(v @ cov @ v), 0.0)), 1e-6)


# --------------------------------------------------------------------------- fitting


def fit_taste(
    catalog: Catalog, config: TasteConfig | None = None, text_encoder: Encoder | None = None
) -> TasteModel:
    """Fit user taste from every dwell event of a session with a user id in ``catalog``: one
    anchored ALS per space, over the same interactions.

    ``text_encoder`` (the catalog's ``text`` space encoder) embeds the vocabulary that
    describes tastes; without it the model describes tastes by images only.
    """
    config = config or TasteConfig()
    started = time.perf_counter()
    spaces = tuple(s for s in (config.spaces or catalog.spaces) if s in catalog.spaces)
    if not spaces:
        raise TasteError(f"none of the spaces {config.spaces} is in this catalog")
    keys = np.flatnonzero(catalog.columns.live).astype(np.int64)
    if not len(keys):
        raise TasteError(f"the catalog at {catalog.path} has no items")
    column = np.full(len(catalog.columns.live), -1, dtype=np.int64)
    column[keys] = np.arange(len(keys))
    user_ids, user_index, item_index, dwell = _read_events(catalog, column)
    if not len(user_ids):
        raise TasteError(
            "No feedback from sessions with a user id in this catalog: taste needs sessions "
            'created with {"user_id": ...} (POST /v1/sessions) and their dwell events.'
        )
    data = interactions(user_index, item_index, dwell, (len(user_ids), len(keys)), config.alpha)
    bases, factors, losses, als_s = {}, {}, {}, 0.0
    for space in spaces:
        bases[space], anchors = space_anchors(catalog, space, keys, config)
        result = fit_als(data, anchors, config)
        factors[space], losses[space] = result.users, result.loss
        als_s += result.seconds
    encoder = text_encoder if "text" in spaces else None
    terms, kinds, vecs = _vocabulary(catalog, encoder, config)
    info = {
        "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "catalog_generation": catalog.generation(),
        "users": len(user_ids),
        "items": len(keys),
        "events": int(len(dwell)),
        "pairs": int(data.weight.nnz),
        "spaces": list(spaces),
        "rank": {space: basis.rank for space, basis in bases.items()},
        "loss": losses,
        "als_s": round(als_s, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    log.info(
        "taste fitted: %d users, %d items, %d events, spaces %s, %d sweeps in %.1f s",
        info["users"],
        info["items"],
        info["events"],
        ", ".join(spaces),
        config.iterations,
        als_s,
    )
    return TasteModel(
        config,
        bases,
        np.array(user_ids, dtype=str),
        factors,
        data.n_items,
        np.array(terms, dtype=str),
        np.array(kinds, dtype=str),
        vecs if vecs is not None else np.zeros((0, 0), dtype=np.float32),
        info,
    )


def _read_events(
    catalog: Catalog, column: NDArray[np.int64]
) -> tuple[list[str], NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """(user ids, user index, item column, dwell) of the catalog's user events on live items."""
    users: dict[str, int] = {}
    u_parts, j_parts, d_parts = [], [], []
    for batch in catalog.iter_user_feedback():
        keys = np.array([key for _, key, _ in batch], dtype=np.int64)
        cols = np.where(keys < len(column), column[np.minimum(keys, len(column) - 1)], -1)
        keep = cols >= 0
        u_parts.append(
            np.array([users.setdefault(u, len(users)) for u, _, _ in batch], dtype=np.int64)[keep]
        )
        j_parts.append(cols[keep])
        d_parts.append(np.array([ms for _, _, ms in batch], dtype=np.float64)[keep])
    if not u_parts:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    user_index = np.concatenate(u_parts)
    seen = np.unique(user_index)  # users whose events were all on deleted items drop out
    remap = np.full(len(users), -1, dtype=np.int64)
    remap[seen] = np.arange(len(seen))
    ids = list(users)
    return (
        [ids[i] for i in seen.tolist()],
        remap[user_index],
        np.concatenate(j_parts),
        np.concatenate(d_parts),
    )


def _vocabulary(
    catalog: Catalog, encoder: Encoder | None, config: TasteConfig
) -> tuple[list[str], list[str], NDArray[np.float32] | None]:
    """The most used tags and prompt terms, embedded in the text space."""
    if encoder is None:
        return [], [], None
    entries: dict[str, str] = {}
    for tag, _ in catalog.tag_counts(config.vocab_tags):
        entries.setdefault(tag, "tag")
    counts: Counter[str] = Counter()
    for item in islice(catalog.iter_items(), config.vocab_items):
        counts.update(item.prompt_terms)
    for term, n in counts.most_common(config.vocab_terms):
        if n >= 2:
            entries.setdefault(term, "term")
    if not entries:
        return [], [], None
    terms = list(entries)
    vectors = encoder.embed_batch(terms)
    return terms, [entries[t] for t in terms], np.asarray(vectors, dtype=np.float32)


# --------------------------------------------------------------------------- serving


class TasteStore:
    """The taste model of a catalog, read from ``taste.npz`` on first use and again whenever
    the file changes (a refit while serving is picked up by the next session)."""

    def __init__(self, path: Path | None = None, model: TasteModel | None = None) -> None:
        self.path = path
        self._model = model
        self._stamp: tuple[int, int] | None = None
        self._error: TasteError | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_catalog(cls, catalog_dir: Path) -> TasteStore:
        return cls(catalog_dir / TASTE_FILE)

    def model(self) -> TasteModel | None:
        """The current model, or None when none was fitted; ``TasteError`` when the file
        cannot be read (read once per version of the file)."""
        if self.path is None:
            return self._model
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._stamp, self._model, self._error = stamp, None, None
                try:
                    self._model = TasteModel.load(self.path)
                    log.info("taste model loaded: %d users", len(self._model))
                except TasteError as exc:
                    self._error = exc
                    log.warning("%s; sessions start without taste until it is fitted again", exc)
            if self._error is not None:
                raise self._error
            return self._model

    def require(self) -> TasteModel:
        model = self.model()
        if model is None:
            raise TasteNotFittedError(
                "No taste model for this catalog yet: run `lookalike taste fit --catalog DIR` "
                "once sessions with a user id have left feedback."
            )
        return model

    def warm_start(self, session: Session) -> None:
        """Blend a known user's taste into the session's starting query (``session.q0``) and
        its re-rank vocabulary (the taste's text-space vector, as a liked prompt)."""
        if session.user_id is None:
            return
        try:
            model = self.model()
        except TasteError:  # logged when read; a broken model must not break searches
            return
        if model is None or session.user_id not in model:
            return
        taste = model.taste(session.user_id)
        session.q0 = model.blend(session.q0, taste)
        weight = model.config.rerank_weight
        terms = [t for t, _, _ in model.nearest_terms(taste, model.config.rerank_terms)]
        session.vocabulary.add(taste.vectors.get("text"), terms=terms, weight=weight)


@dataclass(frozen=True)
class TasteDescription:
    """What a user's taste looks like: the nearest vocabulary (term, kind, cosine) and images
    (id, cosine, prompt) in the primary space. ``borrowed``: neighbours mixed in (a count)."""

    user_id: str
    events: int
    borrowed: int
    terms: list[tuple[str, str, float]]
    images: list[tuple[str, float, str | None]]


def describe_taste(
    store: TasteStore | None,
    catalog: Catalog,
    user_id: str,
    *,
    n_terms: int = 12,
    n_images: int = 8,
    space: str | None = None,
) -> TasteDescription:
    """The terms and images nearest a user's taste (``TasteNotFittedError``,
    ``UnknownUserError``)."""
    if store is None:
        raise TasteNotFittedError("this engine was started without a taste model")
    model = store.require()
    taste = model.taste(user_id)
    target = space or next(
        (s for s in ("visual", "clip", "text") if s in taste.vectors and s in catalog.spaces),
        None,
    )
    images: list[tuple[str, float, str | None]] = []
    if target is not None and n_images > 0:
        scores, keys = catalog.search(target, taste.vectors[target][None, :], n_images)
        found = [(int(k), float(s)) for k, s in zip(keys[0], scores[0], strict=True) if k >= 0]
        items = {item.key: item for item in catalog.items([k for k, _ in found])}
        images = [(items[k].id, s, items[k].prompt) for k, s in found if k in items]
    return TasteDescription(
        user_id, taste.events, taste.borrowed, model.nearest_terms(taste, n_terms), images
    )


def describe_user(engine: Engine, user_id: str, n_terms: int, n_images: int) -> TasteDescription:
    """``describe_taste`` over an engine's catalog and taste store (the HTTP route's call)."""
    store: TasteStore | None = getattr(engine, "taste", None)
    return describe_taste(store, engine.catalog, user_id, n_terms=n_terms, n_images=n_images)


__all__ = [
    "TASTE_FILE",
    "AlsResult",
    "SpaceBasis",
    "Interactions",
    "TasteConfig",
    "TasteDescription",
    "TasteError",
    "TasteModel",
    "TasteNotFittedError",
    "TasteStore",
    "UnknownUserError",
    "UserTaste",
    "describe_taste",
    "describe_user",
    "fit_als",
    "fit_basis",
    "fit_taste",
    "interactions",
    "objective",
    "solve_rows",
]
