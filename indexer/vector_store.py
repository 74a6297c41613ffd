"""The interface the catalog keeps one of per embedding space, and the choice between them.

Two kinds exist: ``faiss`` (the default; snapshots under the catalog's ``faiss/`` folder: a
``VectorIndex`` in memory, or past ``IndexPolicy.compressed_limit`` vectors a
``CompressedIndex`` of PQ codes with its float16 vectors in a file) and ``milvus`` (collections
in a Milvus server, or in the catalog's own Milvus Lite file). Either way SQLite stays the
truth: the manifest records the catalog generation each store reflects, and a store found
behind it is rebuilt from SQLite on open.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from numpy.typing import NDArray

from indexer.compressed_index import MAGIC as COMPRESSED_MAGIC
from indexer.compressed_index import CompressedIndex
from indexer.errors import CatalogError
from indexer.filters import Filters, ItemAttributes
from indexer.vector_index import IndexInfo, IndexPolicy, Keys, VectorIndex

STORE_KINDS = ("faiss", "milvus")
MILVUS_LITE_FILE = "milvus.db"  # a catalog's own Milvus Lite database, when no URI is given


class VectorStore(Protocol):
    """k-NN over one space's (key, vector) pairs. Vectors are float32 (n, dim), L2-normalised;
    scores are cosine similarities; a missing result has key -1."""

    dim: int
    # True: ``search`` applies ``filters`` itself (pushed down into the store) and needs no
    # ``allowed`` mask, so the catalog skips building one; it then also wants ``attributes``.
    filters_itself: ClassVar[bool]

    def __len__(self) -> int: ...

    @property
    def info(self) -> IndexInfo: ...

    def add(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> None:
        """Add or replace rows (``attributes[i]`` describes ``keys[i]``)."""

    def set_attributes(self, keys: Keys, attributes: Sequence[ItemAttributes]) -> None:
        """Refresh what the filters see of existing rows (their vectors are unchanged)."""

    def remove(self, keys: Collection[int]) -> int: ...

    def rebuild(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> object:
        """Replace every row with these (what it returns, e.g. build timings, is optional)."""

    def needs_retype(self) -> bool:
        """True when the store should be rebuilt for its current size."""

    def search(
        self,
        queries: NDArray[np.float32],
        k: int,
        *,
        allowed: NDArray[np.bool_] | None = None,
        filters: Filters | None = None,
        exclude: Collection[int] = (),
    ) -> tuple[NDArray[np.float32], Keys]:
        """Scores (q, k) and keys (q, k) of the k nearest allowed rows not in ``exclude``.

        ``allowed`` (a mask indexed by key) and ``filters`` say the same thing; a store reads
        the one it can use (see ``filters_itself``)."""

    def vectors(self, keys: Keys) -> NDArray[np.float32]: ...

    def save(self, snapshot: Path) -> None:
        """Make the rows durable: FAISS writes ``snapshot``; Milvus flushes its collection."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class StoreConfig:
    """Which vector store a catalog uses, as its manifest records it (never the token).

    ``uri``: for Milvus, a server address (``http://host:19530``) or a Milvus Lite file; None
    means the catalog's own ``milvus.db``. ``collection_prefix`` names the collections
    (``<prefix>_<space>``) so that several catalogs can share one server.
    """

    kind: str = "faiss"
    uri: str | None = None
    token: str | None = None
    collection_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in STORE_KINDS:
            raise CatalogError(
                f"Unknown vector store {self.kind!r}; choose one of {', '.join(STORE_KINDS)}."
            )
        if self.collection_prefix is not None and not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]{0,200}", self.collection_prefix
        ):
            raise CatalogError(
                f"Milvus collection prefix {self.collection_prefix!r} must start with a letter "
                "or underscore and hold only letters, digits and underscores."
            )

    @property
    def milvus_lite(self) -> bool:
        """A Milvus store in a local file: Milvus Lite, run inside the process that opens it."""
        return self.kind == "milvus" and (
            self.uri is None or re.match(r"^[a-z][a-z0-9+.-]*://", self.uri) is None
        )

    def for_new_catalog(self) -> StoreConfig:
        """This config with what a new catalog fixes for good (its collections' prefix)."""
        if self.kind != "milvus" or self.collection_prefix:
            return self
        prefix = f"lookalike_{uuid.uuid4().hex[:12]}"
        return StoreConfig(self.kind, self.uri, self.token, prefix)

    def to_manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind}
        if self.kind == "milvus":
            entry.update(uri=self.uri, collection_prefix=self.collection_prefix)
        return entry

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any] | None) -> StoreConfig:
        entry = entry or {"kind": "faiss"}  # catalogs from before the choice existed
        return cls(
            kind=str(entry.get("kind", "faiss")),
            uri=entry.get("uri"),
            collection_prefix=entry.get("collection_prefix"),
        )

    def with_connection(self, uri: str | None, token: str | None) -> StoreConfig:
        """This config pointed at another server address or with a token (serving a copy)."""
        return StoreConfig(self.kind, uri or self.uri, token or self.token, self.collection_prefix)


def new_store(
    config: StoreConfig, catalog_dir: Path, space: str, dim: int, policy: IndexPolicy
) -> VectorStore:
    """An empty store for ``space``."""
    if config.kind == "milvus":
        from indexer.milvus_store import MilvusStore  # pymilvus is an optional dependency

        return MilvusStore.create(config, catalog_dir, space, dim)
    return VectorIndex(dim, policy)


def open_store(
    config: StoreConfig,
    catalog_dir: Path,
    space: str,
    dim: int,
    policy: IndexPolicy,
    snapshot: Path | None,
    info: dict[str, Any],
) -> VectorStore | None:
    """The store as last saved, or None when there is none to open (rebuild it then).

    ``snapshot`` is the FAISS file to read, None when it is known to be stale."""
    if config.kind == "milvus":
        from indexer.milvus_store import MilvusStore

        return MilvusStore.open(config, catalog_dir, space, dim)
    if snapshot is None or not snapshot.exists():
        return None
    with open(snapshot, "rb") as f:
        compressed = f.read(len(COMPRESSED_MAGIC)) == COMPRESSED_MAGIC
    if compressed:
        return CompressedIndex.load(snapshot, dim, info, policy)
    return VectorIndex.load(snapshot, dim, info, policy)


def faiss_store_for(
    count: int, current: VectorStore, catalog_dir: Path, policy: IndexPolicy
) -> VectorStore:
    """The FAISS store a space of ``count`` vectors should have: ``current`` when it is of the
    right type, else an empty one of that type (CompressedIndex past ``compressed_limit``)."""
    if count > policy.compressed_limit:
        if isinstance(current, CompressedIndex):
            return current
        return CompressedIndex(current.dim, policy, workdir=catalog_dir / "faiss")
    if isinstance(current, VectorIndex):
        return current
    return VectorIndex(current.dim, policy)
