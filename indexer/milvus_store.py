"""A vector store in Milvus: one collection per space, metadata filters pushed down.

Each collection holds the catalog's item key as its primary key, the vector, and the fields
the search filters read (nsfw level, base model, tags, alignment score), so a filtered
search is one Milvus expression and never comes back short. SQLite stays the catalog's truth;
this is an index the catalog can rebuild from it. ``uri`` is a server address
(``http://host:19530``, with a token for Zilliz Cloud or an authenticated server) or a local
file, which runs Milvus Lite inside this process (what the tests use).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from indexer.batching import batched
from indexer.errors import CatalogError
from indexer.filters import Filters, ItemAttributes
from indexer.vector_index import IndexInfo, Keys

if TYPE_CHECKING:
    from pymilvus import MilvusClient

    from indexer.vector_store import StoreConfig

log = logging.getLogger(__name__)

VECTOR_FIELD = "vector"
MAX_TAGS = 1024  # tags kept per item (Milvus arrays have a fixed capacity)
MAX_TEXT = 512  # characters kept of a tag or a base model name
MAX_TOPK = 16_384  # Milvus refuses a larger limit
BATCH = 1000  # rows per insert or upsert call
MISSING_SCORE = -float(np.finfo(np.float32).max)  # what FAISS reports for a missing result


class MilvusStore:
    """One space of a catalog as a Milvus collection (see the module docstring)."""

    filters_itself: ClassVar[bool] = True

    def __init__(self, client: MilvusClient, collection: str, dim: int, index_type: str) -> None:
        self.dim = dim
        self._client = client
        self._collection = collection
        self._index_type = index_type

    # -- connecting -----------------------------------------------------------------------
    @classmethod
    def create(cls, config: StoreConfig, catalog_dir: Path, space: str, dim: int) -> MilvusStore:
        """A new, empty collection for ``space`` (an old one of the same name is dropped)."""
        client, name, lite = _connect(config, catalog_dir, space)
        if client.has_collection(name):
            client.drop_collection(name)
        index_type = "FLAT" if lite else "AUTOINDEX"  # Lite: exact; a server picks HNSW or such
        client.create_collection(
            name,
            schema=_schema(dim),
            index_params=_index_params(client, index_type),
            consistency_level="Strong",  # a search sees every committed write
        )
        return cls(client, name, dim, index_type)

    @classmethod
    def open(
        cls, config: StoreConfig, catalog_dir: Path, space: str, dim: int
    ) -> MilvusStore | None:
        """The existing collection of ``space``; None when it is missing (rebuild it then)."""
        client, name, lite = _connect(config, catalog_dir, space)
        if not client.has_collection(name):
            client.close()
            return None
        fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
        found = int(fields.get(VECTOR_FIELD, {}).get("params", {}).get("dim", -1))
        if found != dim:
            client.close()
            raise CatalogError(
                f"Milvus collection {name} holds {found}-d vectors; this catalog's {space} "
                f"space is {dim}-d. It belongs to another catalog: use another collection prefix."
            )
        client.load_collection(name)
        return cls(client, name, dim, "FLAT" if lite else "AUTOINDEX")

    def close(self) -> None:
        self._client.close()

    # -- size and description -------------------------------------------------------------
    def __len__(self) -> int:
        rows = self._client.query(self._collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def info(self) -> IndexInfo:
        return IndexInfo(f"Milvus {self._index_type}", len(self))

    def needs_retype(self) -> bool:
        return False  # Milvus manages its own index as the collection grows

    # -- mutation -------------------------------------------------------------------------
    def add(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> None:
        """Add or replace rows; ``attributes`` are required (the filters read them here)."""
        if attributes is None or len(attributes) != len(keys):
            raise ValueError("MilvusStore.add needs one ItemAttributes per key")
        vectors = np.asarray(vectors, dtype=np.float32)
        for rows in batched(
            (
                {"key": int(k), VECTOR_FIELD: vectors[i].tolist(), **_fields(attributes[i])}
                for i, k in enumerate(keys)
            ),
            BATCH,
        ):
            self._client.upsert(self._collection, rows)

    def set_attributes(self, keys: Keys, attributes: Sequence[ItemAttributes]) -> None:
        for rows in batched(
            ({"key": int(k), **_fields(a)} for k, a in zip(keys, attributes, strict=True)),
            BATCH,
        ):
            self._client.upsert(self._collection, rows, partial_update=True)

    def remove(self, keys: Collection[int]) -> int:
        if not keys:
            return 0
        result = self._client.delete(self._collection, ids=[int(k) for k in keys])
        return int(result.get("delete_count", len(keys)) if isinstance(result, dict) else len(keys))

    def rebuild(
        self,
        keys: Keys,
        vectors: NDArray[np.float32],
        attributes: Sequence[ItemAttributes] | None = None,
    ) -> None:
        """Replace the collection's rows with these (an emptied collection, then inserts)."""
        self._client.drop_collection(self._collection)
        self._client.create_collection(
            self._collection,
            schema=_schema(self.dim),
            index_params=_index_params(self._client, self._index_type),
            consistency_level="Strong",
        )
        self.add(keys, vectors, attributes)

    def save(self, snapshot: Path) -> None:
        """Flush the collection (Milvus keeps it; ``snapshot`` is a FAISS store's file)."""
        self._client.flush(self._collection)

    # -- reading --------------------------------------------------------------------------
    def search(
        self,
        queries: NDArray[np.float32],
        k: int,
        *,
        allowed: NDArray[np.bool_] | None = None,
        filters: Filters | None = None,
        exclude: Collection[int] = (),
    ) -> tuple[NDArray[np.float32], Keys]:
        """k-NN by cosine with ``filters`` and ``exclude`` pushed down as one expression."""
        if allowed is not None:
            raise ValueError("MilvusStore filters by Filters, not by a key mask")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = max(1, min(k, MAX_TOPK))
        hits = self._client.search(
            self._collection,
            data=queries.tolist(),
            limit=k,
            filter=milvus_filter(filters, exclude),
            anns_field=VECTOR_FIELD,
            search_params={"metric_type": "IP"},
            output_fields=[],
        )
        scores = np.full((len(queries), k), MISSING_SCORE, dtype=np.float32)
        keys = np.full((len(queries), k), -1, dtype=np.int64)
        for row, found in enumerate(hits):
            for col, hit in enumerate(found):
                keys[row, col] = int(hit["key"] if "key" in hit else hit["id"])
                scores[row, col] = float(hit["distance"])
        return scores, keys

    def vectors(self, keys: Keys) -> NDArray[np.float32]:
        """Stored vectors for ``keys`` (all must be present): float32 (n, dim)."""
        wanted = [int(k) for k in keys]
        out = np.zeros((len(wanted), self.dim), dtype=np.float32)
        if not wanted:
            return out
        rows = self._client.get(self._collection, ids=wanted, output_fields=[VECTOR_FIELD])
        found = {int(r["key"]): r[VECTOR_FIELD] for r in rows}
        for i, key in enumerate(wanted):
            if key not in found:
                raise KeyError(f"key {key} is not in Milvus collection {self._collection}")
            out[i] = found[key]
        return out


def milvus_filter(filters: Filters | None, exclude: Collection[int] = ()) -> str:
    """The Milvus boolean expression for ``filters`` and excluded keys ("" for none).

    Strings are written as JSON string literals, which Milvus parses the same way, so a tag
    holding quotes or backslashes cannot change the expression."""
    parts: list[str] = []
    if filters is not None:
        if filters.max_nsfw_level is not None:
            parts.append(f"nsfw_level <= {int(filters.max_nsfw_level)}")
        if filters.base_models:
            parts.append(f"base_model in {_literal([m[:MAX_TEXT] for m in filters.base_models])}")
        parts += [f"array_contains(tags, {_literal(t)})" for t in _tags(filters.tags_required)]
        excluded = _tags(filters.tags_excluded)
        if excluded:
            parts.append(f"not array_contains_any(tags, {_literal(excluded)})")
        if filters.min_alignment is not None:
            if not math.isfinite(filters.min_alignment):
                raise ValueError("min_alignment must be a finite number")
            parts.append(f"alignment >= {float(filters.min_alignment)!r}")
    if len(exclude):
        parts.append(f"key not in {_literal(sorted(int(k) for k in exclude))}")
    return " and ".join(f"({p})" for p in parts)


# -- internals ----------------------------------------------------------------------------
def _connect(config: StoreConfig, catalog_dir: Path, space: str) -> tuple[MilvusClient, str, bool]:
    """A client, the space's collection name, and whether it is Milvus Lite (a local file)."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise CatalogError(
            "This catalog keeps its vectors in Milvus, which needs pymilvus: "
            "pip install 'lookalike[milvus]'"
        ) from None
    from indexer.vector_store import MILVUS_LITE_FILE

    uri = config.uri or str(catalog_dir / MILVUS_LITE_FILE)
    lite = config.milvus_lite
    if not config.collection_prefix:
        raise CatalogError("A Milvus catalog needs a collection prefix in its manifest")
    try:
        client = MilvusClient(uri=uri, token=config.token or "")
    except Exception as exc:  # pymilvus raises its own and grpc errors alike
        raise CatalogError(f"Cannot connect to Milvus at {uri}: {exc}") from exc
    return client, f"{config.collection_prefix}_{space}", lite


def _schema(dim: int) -> Any:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("nsfw_level", DataType.INT64)
    schema.add_field("base_model", DataType.VARCHAR, max_length=MAX_TEXT, nullable=True)
    schema.add_field(
        "tags",
        DataType.ARRAY,
        element_type=DataType.VARCHAR,
        max_capacity=MAX_TAGS,
        max_length=MAX_TEXT,
    )
    schema.add_field("alignment", DataType.FLOAT, nullable=True)
    return schema


def _index_params(client: MilvusClient, index_type: str) -> Any:
    params = client.prepare_index_params()
    params.add_index(VECTOR_FIELD, index_type=index_type, metric_type="IP")
    return params


def _fields(attributes: ItemAttributes) -> dict[str, Any]:
    return {
        "nsfw_level": int(attributes.nsfw_level),
        "base_model": attributes.base_model[:MAX_TEXT] if attributes.base_model else None,
        "tags": [t[:MAX_TEXT] for t in attributes.tags[:MAX_TAGS]],
        "alignment": (
            float(attributes.alignment)
            if attributes.alignment is not None and math.isfinite(attributes.alignment)
            else None
        ),
    }


def _tags(tags: Sequence[str]) -> list[str]:
    """Tags as the catalog stores them: stripped, lower-case, no empties."""
    return sorted({t.strip().lower()[:MAX_TEXT] for t in tags if t.strip()})


def _literal(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)
