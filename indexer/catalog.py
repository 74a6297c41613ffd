"""The on-disk catalog: SQLite (WAL) for items, tags, vectors and feedback; one vector store
per space (FAISS by default, or Milvus: see ``vector_store``); a manifest.

SQLite is the source of truth: every write is one transaction that bumps a generation counter,
and item vectors are stored there too. The manifest records the generation each space's store
reflects (FAISS files are snapshots written atomically with it); a store found behind (a crash
between the two) is rebuilt from SQLite when the catalog is opened. So a crash at any moment
leaves either the old or the new state, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson
from numpy.typing import NDArray

from indexer.arrays import grown
from indexer.compressed_index import CompressedIndex
from indexer.encoders.base import EncoderSpec
from indexer.errors import CatalogError, DiskFullError, EncoderMismatchError
from indexer.filters import Filters, ItemAttributes
from indexer.prompts import PROMPT_TERMS_VERSION, item_terms, prompt_terms
from indexer.records import NSFW_LEVELS, DumpRecord
from indexer.row_cache import RowCache
from indexer.storage import atomic_write_bytes, translate_disk_full
from indexer.term_column import TermColumn, TermRuns
from indexer.vector_index import IndexPolicy, Keys
from indexer.vector_store import StoreConfig, VectorStore, faiss_store_for, new_store, open_store

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "catalog.sqlite"
INDEX_DIR = "faiss"
TERMS_FILE = "terms.bin"  # the items' terms by key (``TermColumn``), a snapshot like FAISS's
ITEM_CACHE_SIZE = 20_000  # item rows kept in memory (about 1 KB each)
SUMMARY_CACHE_SIZE = 100_000  # item summaries kept in memory (about 0.7 KB each)
MASK_CACHE_SIZE = 8  # filter masks kept per catalog revision (1 byte per item key each)

# Named migrations, applied in order; PRAGMA user_version counts how many ran.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "items, tags, vectors",
        """
        CREATE TABLE items (
            key INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            file TEXT NOT NULL,
            content_hash TEXT NOT NULL,
            file_size INTEGER NOT NULL,
            file_mtime_ns INTEGER NOT NULL,
            width INTEGER, height INTEGER,
            prompt TEXT, negative_prompt TEXT,
            tags TEXT NOT NULL DEFAULT '[]',
            nsfw_level INTEGER NOT NULL DEFAULT 0,
            base_model TEXT, model_name TEXT, created_at TEXT, username TEXT, url TEXT,
            stats TEXT NOT NULL DEFAULT '{}', meta TEXT NOT NULL DEFAULT '{}',
            source TEXT NOT NULL DEFAULT 'dump',
            added_at REAL NOT NULL
        );
        CREATE INDEX items_file ON items(file);
        CREATE INDEX items_hash ON items(content_hash);
        CREATE TABLE item_tags (tag TEXT NOT NULL, key INTEGER NOT NULL,
                                PRIMARY KEY (tag, key)) WITHOUT ROWID;
        CREATE INDEX item_tags_key ON item_tags(key);
        CREATE TABLE vectors (space TEXT NOT NULL, key INTEGER NOT NULL, vec BLOB NOT NULL,
                              PRIMARY KEY (space, key)) WITHOUT ROWID;
        CREATE TABLE duplicates (id TEXT PRIMARY KEY, of_key INTEGER NOT NULL, file TEXT NOT NULL,
                                 file_size INTEGER NOT NULL, file_mtime_ns INTEGER NOT NULL);
        CREATE INDEX duplicates_file ON duplicates(file);
        CREATE TABLE skipped (file TEXT PRIMARY KEY, reason TEXT NOT NULL, detail TEXT,
                              file_size INTEGER NOT NULL, file_mtime_ns INTEGER NOT NULL);
        CREATE TABLE state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO state VALUES ('generation', 0);
        """,
    ),
    (
        "feedback events",
        """
        CREATE TABLE feedback (
            event_id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            user_id TEXT,
            image_id TEXT NOT NULL,
            dwell_ms REAL NOT NULL,
            received_at REAL NOT NULL
        );
        CREATE INDEX feedback_user ON feedback(user_id);
        """,
    ),
    (
        "prompt-image alignment",
        # 100 x CLIP cosine of an item's prompt and image; NULL: the item has no prompt to score.
        # A row is deleted when the item's image or prompt changes, so absent means "to score".
        "CREATE TABLE alignment (key INTEGER PRIMARY KEY, score REAL);",
    ),
    (
        "dump positions",
        # Where each id stands in its dump's order (iter_dump): `lookalike merge` keeps, of the
        # same bytes indexed by two shards, the copy a single run would have met first.
        """
        CREATE TABLE dump_positions (id TEXT PRIMARY KEY, position INTEGER NOT NULL)
            WITHOUT ROWID;
        CREATE INDEX duplicates_of_key ON duplicates(of_key);
        """,
    ),
    (
        "parsed prompt terms",
        # JSON list of the prompt's salient terms (indexer/prompts.py), parsed when the item is
        # written; NULL: not parsed yet (rows from before this migration, or parsed under an
        # older PROMPT_TERMS_VERSION), filled in when the catalog is opened.
        "ALTER TABLE items ADD COLUMN prompt_terms TEXT;",
    ),
)
PROMPT_TERMS_CHUNK = 20_000  # rows parsed per transaction when a catalog's prompts are re-read


class ItemSummary(NamedTuple):
    """What a feed page reads of each item it shows, and feedback of each item it steers with
    (far less to decode than a ``CatalogItem``); re-ranking reads the term column instead."""

    key: int
    id: str
    prompt: str | None
    tags: tuple[str, ...]
    prompt_terms: tuple[str, ...]
    width: int | None
    height: int | None
    nsfw_level: int
    source: str


@dataclass(frozen=True)
class CatalogItem:
    """One indexed image as the recommender and the service see it."""

    key: int
    id: str
    file: str
    content_hash: str
    width: int | None
    height: int | None
    prompt: str | None
    negative_prompt: str | None
    tags: tuple[str, ...]
    nsfw_level: int
    base_model: str | None
    model_name: str | None
    created_at: str | None
    username: str | None
    url: str | None
    stats_json: str
    meta_json: str
    source: str
    prompt_terms: tuple[str, ...]  # the prompt's salient terms, parsed at index time

    # Decoded on first use: a feed page reads hundreds of items and needs neither.
    @cached_property
    def stats(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.stats_json)
        return value

    @cached_property
    def meta(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.meta_json)
        return value

    @property
    def nsfw_name(self) -> str:
        return nsfw_level_name(self.nsfw_level)

    @property
    def generated(self) -> bool:
        return is_generated(self.source)


def nsfw_level_name(level: int) -> str:
    """civitai's name of an nsfw level (levels past the known ones take the last name)."""
    return NSFW_LEVELS[min(max(level, 0), len(NSFW_LEVELS) - 1)]


def is_generated(source: str) -> bool:
    """Whether an item with this ``source`` was made by the generator (not from the dump)."""
    return source == "generated"


@dataclass(frozen=True)
class NewItem:
    """An item ready to be added: its record, where its bytes are, and what they hash to.

    ``file`` is an absolute path, or a path relative to the catalog directory for files the
    catalog owns (generated images).
    """

    record: DumpRecord
    file: str
    content_hash: str
    file_size: int
    file_mtime_ns: int
    width: int
    height: int
    source: str = "dump"
    extra_meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileState:
    """What the catalog already knows about a file, for incremental re-runs."""

    kind: str  # "item" | "duplicate" | "skipped"
    id: str | None
    content_hash: str | None
    file_size: int
    file_mtime_ns: int


class Columns:
    """Per-key metadata held in memory for fast filtering: arrays indexed by item key.

    ``nsfw_level`` is -1 where no live item has that key; ``base_model`` holds codes from
    ``base_model_codes`` (-1 for none).
    """

    def __init__(self) -> None:
        self.nsfw_level: NDArray[np.int8] = np.full(0, -1, dtype=np.int8)
        self.base_model: NDArray[np.int32] = np.full(0, -1, dtype=np.int32)
        self.base_model_codes: dict[str, int] = {}

    @property
    def live(self) -> NDArray[np.bool_]:
        return self.nsfw_level >= 0

    def set(self, key: int, nsfw_level: int, base_model: str | None) -> None:
        if key >= len(self.nsfw_level):
            size = max(key + 1, 1024)
            self.nsfw_level = grown(self.nsfw_level, size, fill=-1, spare=1.0)
            self.base_model = grown(self.base_model, len(self.nsfw_level), fill=-1)
        self.nsfw_level[key] = nsfw_level
        self.base_model[key] = self.code(base_model) if base_model else -1

    def clear(self, key: int) -> None:
        if key < len(self.nsfw_level):
            self.nsfw_level[key] = -1
            self.base_model[key] = -1

    def code(self, base_model: str) -> int:
        return self.base_model_codes.setdefault(base_model, len(self.base_model_codes))


def encoder_entry(spec: EncoderSpec) -> dict[str, Any]:
    """How the manifest records an encoder; two catalogs match when these dicts are equal."""
    return {
        "name": spec.name,
        "family": spec.family,
        "model": spec.model,
        "revision": spec.revision,
        "dim": spec.dim,
    }


class Catalog:
    """An open catalog directory. Thread-safe: one SQLite connection for writes behind a lock,
    and one read-only connection for the service's hot reads (items, ids, the generation), so
    that a feed page never waits for a write's commit (WAL readers see the last commit)."""

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        manifest: dict[str, Any],
        policy: IndexPolicy,
        store: StoreConfig,
    ) -> None:
        self.path = path
        self._conn = conn
        self._lock = threading.RLock()
        self.manifest = manifest
        self.policy = policy
        self.store = store
        self.columns = Columns()
        self.terms = TermColumn()  # each item's ``item_terms``: what re-ranking reads
        self.indexes: dict[str, VectorStore] = {}
        self._dirty: set[str] = set()
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        # Successive pages of a scroll re-read most of their candidates, so rows are cached;
        # the writes that change a row (replace, update_metadata, delete) drop it from these.
        self._item_cache = RowCache(ITEM_CACHE_SIZE, self._read_items)
        self._summary_cache: RowCache[tuple[Any, ...]] = RowCache(
            SUMMARY_CACHE_SIZE, self._read_summaries
        )
        self._alignment: tuple[int, NDArray[np.float32]] | None = None
        self._alignment_writes = 0  # changes to alignment rows: the cached array's version
        # Filter masks by filters, for one revision: every search of a filtered session needs
        # its mask, and building one scans the columns and reads a tag filter's postings (an
        # excluded tag on 20,000 of 1M items added 46 ms to every page).
        self._masks: tuple[int, dict[Filters, NDArray[np.bool_]]] = (-1, {})

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        path: Path,
        encoders: Mapping[str, EncoderSpec],
        policy: IndexPolicy | None = None,
        store: StoreConfig | None = None,
    ) -> Catalog:
        """Open the catalog at ``path`` (checking its encoders) or create an empty one.

        ``store`` chooses a new catalog's vector store (FAISS by default); for an existing one
        it may only change where its Milvus server is (see :meth:`open`)."""
        if (path / MANIFEST).exists():
            return cls.open(path, expected=encoders, policy=policy, store=store)
        path.mkdir(parents=True, exist_ok=True)
        if (path / DATABASE).exists():
            # A crash before the first manifest write: the database is the truth, start it over.
            log.warning("%s has a database but no manifest; starting it afresh", path)
            for leftover in (DATABASE, DATABASE + "-wal", DATABASE + "-shm"):
                (path / leftover).unlink(missing_ok=True)
        store = (store or StoreConfig()).for_new_catalog()
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "encoders": {space: encoder_entry(spec) for space, spec in encoders.items()},
            "vector_store": store.to_manifest(),
            "spaces": {},
            "items": 0,
        }
        catalog = cls(path, _connect(path / DATABASE), manifest, policy or IndexPolicy(), store)
        for space, spec in encoders.items():
            catalog.indexes[space] = new_store(store, path, space, spec.dim, catalog.policy)
        catalog._dirty = set(encoders)
        catalog.checkpoint()
        return catalog

    @classmethod
    def open(
        cls,
        path: Path,
        expected: Mapping[str, EncoderSpec] | None = None,
        policy: IndexPolicy | None = None,
        store: StoreConfig | None = None,
    ) -> Catalog:
        """Open an existing catalog; refuse it if ``expected`` encoders differ from its own.

        The manifest says which vector store the catalog uses; ``store`` may point a Milvus
        catalog at another server address or give its token, never change the kind."""
        manifest = cls.read_manifest(path)
        if expected is not None:
            _check_encoders(path, manifest["encoders"], expected)
        own = StoreConfig.from_manifest(manifest.get("vector_store"))
        if store is not None and store.kind != own.kind:
            raise CatalogError(
                f"{path} keeps its vectors in {own.kind}, not {store.kind}; a catalog's vector "
                "store is chosen when it is created (index into a new catalog to change it)."
            )
        if store is not None:
            own = own.with_connection(store.uri, store.token)
        catalog = cls(path, _connect(path / DATABASE), manifest, policy or IndexPolicy(), own)
        catalog._load_columns()
        catalog._load_indexes()
        return catalog

    @staticmethod
    def read_manifest(path: Path) -> dict[str, Any]:
        """The manifest of the catalog at ``path``; CatalogError if absent, corrupt or foreign."""
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise CatalogError(
                f"No catalog at {path} (no {MANIFEST}). Build one with "
                f"`lookalike index DUMP --catalog {path}`."
            )
        try:
            manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CatalogError(f"Cannot read {manifest_path}: {exc}") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CatalogError(
                f"{path} has catalog format {manifest.get('format_version')!r}; "
                f"this lookalike reads format {FORMAT_VERSION}."
            )
        return manifest

    def close(self) -> None:
        with self._lock, self._read_lock:
            if self._reader is not None:  # first: the last connection out cleans up the WAL
                self._reader.close()
                self._reader = None
            # Fold the WAL into the database first. The last connection out deletes the WAL,
            # but two processes closing at once (serve --workers) can each see the other
            # still open and both leave it; folded, what is left is an empty file.
            with contextlib.suppress(sqlite3.Error):  # busy past the timeout, read-only media
                self._conn.execute("PRAGMA busy_timeout = 1000")  # a close waits 1 s, not 10
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            for index in self.indexes.values():
                index.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- description ----------------------------------------------------------------------
    @property
    def spaces(self) -> tuple[str, ...]:
        return tuple(self.manifest["encoders"])

    def __len__(self) -> int:
        return self._scalar("SELECT COUNT(*) FROM items")

    @property
    def revision(self) -> int:
        """A number that changes with every write this process makes to items, their filter
        columns or alignment scores: cached search results compare it to know they are stale."""
        return self._item_cache.version + self._alignment_writes

    def generation(self) -> int:
        """The count of committed writes that changed items (stamps the FAISS snapshots)."""
        return int(self._read("SELECT value FROM state WHERE name = 'generation'")[0][0])

    def info(self) -> dict[str, Any]:
        """The summary `lookalike info --json` prints."""
        with self._lock:
            sources = dict(self._conn.execute("SELECT source, COUNT(*) FROM items GROUP BY source"))
            duplicates = self._scalar("SELECT COUNT(*) FROM duplicates")
            skipped = dict(
                self._conn.execute("SELECT reason, COUNT(*) FROM skipped GROUP BY reason")
            )
        return {
            "path": str(self.path),
            "format_version": self.manifest["format_version"],
            "items": len(self),
            "sources": sources,
            "duplicates": duplicates,
            "skipped": skipped,
            "spaces": {
                space: {"dim": index.dim, **index.info.to_json()}
                for space, index in self.indexes.items()
            },
            "encoders": self.manifest["encoders"],
            "generation": self.generation(),
        }

    # -- incremental indexing support -----------------------------------------------------
    def file_state(self, file: str) -> FileState | None:
        """What is known about ``file`` (an item, a duplicate alias, or a skip), if anything."""
        return self.file_states([file]).get(file)

    def file_states(self, files: Sequence[str]) -> dict[str, FileState]:
        """:meth:`file_state` of each of ``files`` that the catalog knows, in a few queries."""
        states: dict[str, FileState] = {}
        first_key: dict[str, int] = {}  # several items may share a file: the first one wins
        with self._lock:
            for kind, sql in _FILE_STATE_QUERIES:
                wanted = [f for f in dict.fromkeys(files) if f not in states]
                for chunk, marks in _in_batches(wanted):
                    for file, key, *row in self._conn.execute(sql.format(marks=marks), chunk):
                        if file not in states or key < first_key[file]:
                            states[file], first_key[file] = FileState(kind, *row), key
        return states

    def key_for_hash(self, content_hash: str) -> int | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT key FROM items WHERE content_hash = ? LIMIT 1", (content_hash,)
            ).fetchone()
        return int(row[0]) if row else None

    def key_for_id(self, item_id: str, *, follow_aliases: bool = True) -> int | None:
        """The key of an item id, following duplicate aliases to the stored item (unless
        ``follow_aliases`` is False: then only an item stored under this very id counts)."""
        rows = self._read("SELECT key FROM items WHERE id = ?", (item_id,))
        if not rows and follow_aliases:
            rows = self._read("SELECT of_key FROM duplicates WHERE id = ?", (item_id,))
        return int(rows[0][0]) if rows else None

    def keys_for_ids(self, item_ids: Sequence[str]) -> list[int | None]:
        """``key_for_id`` of each id, in order, in a query a batch (another for the ids that
        are not stored items: duplicate aliases, or unknown)."""
        found: dict[str, int] = {}
        for table, column in (("items", "key"), ("duplicates", "of_key")):
            wanted = [i for i in dict.fromkeys(item_ids) if i not in found]
            for chunk, marks in _in_batches(wanted):
                sql = f"SELECT id, {column} FROM {table} WHERE id IN ({marks})"
                found.update((i, int(k)) for i, k in self._read(sql, chunk))
        return [found.get(i) for i in item_ids]

    # -- writes ---------------------------------------------------------------------------
    def add(self, items: Sequence[NewItem], vectors: Mapping[str, NDArray[np.float32]]) -> Keys:
        """Add (or replace, by id) items with their vectors for every space, in one transaction.

        ``vectors[space]`` is float32 (len(items), dim), L2-normalised, row i for items[i].
        Returns the items' keys. A replaced id keeps its key.
        """
        missing = set(self.spaces) - set(vectors)
        if missing:
            raise ValueError(f"vectors missing for spaces {sorted(missing)}")
        keys = np.zeros(len(items), dtype=np.int64)
        now = time.time()
        with self._lock, translate_disk_full("adding items to the catalog"), self._conn:
            # Statements per batch rather than per item: indexing on a GPU waits on this thread.
            known = self._keys_by_id([item.record.id for item in items])
            tags: dict[int, Sequence[str]] = {}
            for i, item in enumerate(items):
                keys[i] = known[item.record.id] = self._upsert_item(item, now, known)
                tags[int(keys[i])] = item.record.tags  # an id given twice: its last tags
            self._conn.executemany(
                "DELETE FROM skipped WHERE file = ?", ((item.file,) for item in items)
            )
            # An alias whose file now holds bytes of its own is an item from here on, not both.
            self._conn.executemany(
                "DELETE FROM duplicates WHERE id = ?", ((item.record.id,) for item in items)
            )
            self._set_tags(tags)
            for space in self.spaces:
                block = np.ascontiguousarray(vectors[space], dtype=np.float32)
                self._conn.executemany(
                    "INSERT OR REPLACE INTO vectors (space, key, vec) VALUES (?, ?, ?)",
                    ((space, int(k), block[i].tobytes()) for i, k in enumerate(keys)),
                )
            self._bump_generation()
        attributes = self._new_attributes(items) if self._stores_filter() else None
        for space in self.spaces:
            self.indexes[space].add(keys, vectors[space], attributes)
            self._dirty.add(space)
        for item, key in zip(items, keys, strict=True):
            self.columns.set(int(key), item.record.nsfw_level, item.record.base_model)
            self.terms.set(int(key), _record_terms(item.record))
        self._forget(keys.tolist())  # a replaced id keeps its key
        return keys

    def update_metadata(self, item_id: str, record: DumpRecord) -> bool:
        """Refresh an item's metadata from a re-read record (same image bytes). True if changed."""
        values = _record_values(record)
        with self._lock, translate_disk_full("updating metadata"), self._conn:
            row = self._conn.execute("SELECT key FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return False
            cursor = self._conn.execute(
                f"UPDATE items SET {', '.join(f'{c} = ?' for c in values)} WHERE id = ? AND "
                f"({' OR '.join(f'{c} IS NOT ?' for c in values)})",
                (*values.values(), item_id, *values.values()),
            )
            if cursor.rowcount == 0:
                return False
            self._set_tags({int(row[0]): record.tags})
            self._conn.execute("DELETE FROM alignment WHERE key = ?", (int(row[0]),))
            self._alignment_writes += 1
            self._bump_generation()
        self.columns.set(int(row[0]), record.nsfw_level, record.base_model)
        self.terms.set(int(row[0]), _record_terms(record))
        self._forget([int(row[0])])
        self._sync_attributes([int(row[0])])
        return True

    def rename(self, old_id: str, new_id: str) -> bool:
        """Store the item ``old_id`` under ``new_id`` from now on, keeping ``old_id`` as an
        alias of it (links and feedback that name it still find it). False, and nothing
        changed, when there is no ``old_id`` item or ``new_id`` names another item."""
        with self._lock, translate_disk_full("renaming an item"), self._conn:
            row = self._conn.execute(
                "SELECT key, file, file_size, file_mtime_ns FROM items WHERE id = ?", (old_id,)
            ).fetchone()
            if row is None:
                return False
            key = int(row[0])
            taken = self._conn.execute(
                "SELECT key FROM items WHERE id = ? UNION ALL "
                "SELECT of_key FROM duplicates WHERE id = ?",
                (new_id, new_id),
            ).fetchall()
            if any(int(k) != key for (k,) in taken):
                return False
            # An alias of this very item (an earlier run's) makes way for the item itself.
            self._conn.execute("DELETE FROM duplicates WHERE id = ?", (new_id,))
            self._conn.execute("UPDATE items SET id = ? WHERE key = ?", (new_id, key))
            self._conn.execute(
                "INSERT OR REPLACE INTO duplicates VALUES (?, ?, ?, ?, ?)", (old_id, *row)
            )
            self._bump_generation()
        self._forget([key])
        return True

    def add_duplicate(self, item_id: str, of_key: int, file: str, size: int, mtime_ns: int) -> None:
        """Record ``item_id`` as an exact duplicate of the stored item ``of_key``."""
        with self._lock, translate_disk_full("recording a duplicate"), self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO duplicates VALUES (?, ?, ?, ?, ?)",
                (item_id, of_key, file, size, mtime_ns),
            )
            self._conn.execute("DELETE FROM skipped WHERE file = ?", (file,))

    def record_skip(self, file: str, reason: str, detail: str, size: int, mtime_ns: int) -> None:
        """Remember a rejected file so an unchanged copy is not decoded again on re-runs."""
        with self._lock, translate_disk_full("recording a skipped file"), self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO skipped VALUES (?, ?, ?, ?, ?)",
                (file, reason, detail[:500], size, mtime_ns),
            )

    def aliases_of(self, ids: Sequence[str]) -> list[str]:
        """The duplicate ids (other files with the same bytes, stored once) naming the items
        ``ids``: ``delete`` removes them with their items."""
        aliases: list[str] = []
        for chunk, marks in _in_batches(ids):
            aliases += [
                row[0]
                for row in self._read(
                    "SELECT d.id FROM duplicates d JOIN items i ON i.key = d.of_key "
                    f"WHERE i.id IN ({marks}) ORDER BY d.id",
                    chunk,
                )
            ]
        return aliases

    def delete(self, ids: Iterable[str]) -> list[str]:
        """Delete items (and duplicate aliases) by id. Returns the ids that existed.

        Image files the catalog owns (generated ones, under its directory) go too; a dump's
        files are the user's and stay."""
        deleted: list[str] = []
        removed_keys: list[int] = []
        owned_files: list[Path] = []
        with self._lock, translate_disk_full("deleting items"), self._conn:
            for item_id in ids:
                row = self._conn.execute(
                    "SELECT key, file FROM items WHERE id = ?", (item_id,)
                ).fetchone()
                if row is not None:
                    key = int(row[0])
                    if not Path(row[1]).is_absolute():  # a file the catalog owns (generated)
                        owned_files.append(self.path / row[1])
                    for table in ("items", "item_tags", "vectors", "alignment"):
                        self._conn.execute(f"DELETE FROM {table} WHERE key = ?", (key,))
                    self._conn.execute("DELETE FROM duplicates WHERE of_key = ?", (key,))
                    removed_keys.append(key)
                    deleted.append(item_id)
                elif self._conn.execute("DELETE FROM duplicates WHERE id = ?", (item_id,)).rowcount:
                    deleted.append(item_id)
            if deleted:
                self._bump_generation()
        for space, index in self.indexes.items():
            if removed_keys:
                index.remove(removed_keys)
                self._dirty.add(space)
        for key in removed_keys:
            self.columns.clear(key)
            self.terms.clear(key)
        self._forget(removed_keys)
        if deleted:
            self.checkpoint()
        for file in owned_files:  # after the commit: a crash before this leaves only a file
            file.unlink(missing_ok=True)
        return deleted

    def checkpoint(self) -> None:
        """Write changed FAISS snapshots and the manifest atomically (indexes first)."""
        generation = self.generation()
        index_dir = self.path / INDEX_DIR
        for space in sorted(self._dirty):
            index = self.indexes[space]
            if index.needs_retype():
                self._rebuild_space(space)
            index.save(index_dir / f"{space}.faiss")
            self.manifest["spaces"][space] = {
                "dim": index.dim,
                "generation": generation,
                **index.info.to_json(),
            }
        self._dirty.clear()
        stamp = self._terms_stamp(generation)
        if self.terms.dirty or self.terms.stamp != stamp:
            self.terms.save(self.path / TERMS_FILE, stamp)
        self.manifest["items"] = len(self)
        self.manifest["generation"] = generation
        atomic_write_bytes(
            self.path / MANIFEST, json.dumps(self.manifest, indent=2, sort_keys=True).encode()
        )

    # -- feedback -------------------------------------------------------------------------
    def record_feedback(
        self,
        session_id: str,
        user_id: str | None,
        events: Sequence[tuple[str, str, float]],
    ) -> tuple[list[int], int]:
        """Store (event_id, image_id, dwell_ms) events durably, ignoring known event ids.

        Returns the indexes (into ``events``) of the newly stored ones and the duplicate count.
        The transaction is committed (fsynced) before this returns.
        """
        fresh: list[int] = []
        now = time.time()
        with self._lock, translate_disk_full("storing feedback"), self._conn:
            for i, (event_id, image_id, dwell_ms) in enumerate(events):
                cursor = self._conn.execute(
                    "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?)",
                    (event_id, session_id, user_id, image_id, float(dwell_ms), now),
                )
                if cursor.rowcount:
                    fresh.append(i)
        return fresh, len(events) - len(fresh)

    def feedback_rows(self) -> list[tuple[str, str | None, str, float]]:
        """All stored events as (session_id, user_id, image_id, dwell_ms), oldest first."""
        with self._lock:
            return list(
                self._conn.execute(
                    "SELECT session_id, user_id, image_id, dwell_ms FROM feedback "
                    "ORDER BY received_at, rowid"
                )
            )

    def iter_user_feedback(self, batch: int = 100_000) -> Iterable[list[tuple[str, int, float]]]:
        """Events of sessions with a user id as (user_id, item key, dwell_ms), in batches.

        Image ids resolve to item keys (duplicate aliases to the stored item); events on items
        that are gone are left out. Oldest first.
        """
        last = -1
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT f.rowid, f.user_id, COALESCE(i.key, d.of_key), f.dwell_ms "
                    "FROM feedback f LEFT JOIN items i ON i.id = f.image_id "
                    "LEFT JOIN duplicates d ON d.id = f.image_id "
                    "WHERE f.user_id IS NOT NULL AND f.rowid > ? ORDER BY f.rowid LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [(user, int(key), float(ms)) for _, user, key, ms in rows if key is not None]

    def tag_counts(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` most used tags with their item counts, most used first."""
        with self._lock:
            return list(
                self._conn.execute(
                    "SELECT tag, COUNT(*) AS n FROM item_tags GROUP BY tag "
                    "ORDER BY n DESC, tag LIMIT ?",
                    (limit,),
                )
            )

    # -- prompt-image alignment -----------------------------------------------------------
    def items_to_align(self, after_key: int, limit: int) -> list[tuple[int, str | None]]:
        """(key, prompt) of items with no alignment row yet, by key, after ``after_key``."""
        with self._lock:
            return list(
                self._conn.execute(
                    "SELECT i.key, i.prompt FROM items i LEFT JOIN alignment a ON a.key = i.key "
                    "WHERE a.key IS NULL AND i.key > ? ORDER BY i.key LIMIT ?",
                    (after_key, limit),
                )
            )

    def set_alignment(self, keys: Sequence[int], scores: Sequence[float]) -> None:
        """Store prompt-image alignment scores (NaN: the item has no prompt to score)."""
        with self._lock, translate_disk_full("storing alignment scores"), self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO alignment (key, score) VALUES (?, ?)",
                (
                    (int(k), float(v) if np.isfinite(v) else None)
                    for k, v in zip(keys, scores, strict=True)
                ),
            )
            self._alignment_writes += 1
        self._sync_attributes(keys)

    def alignment_scores(self) -> NDArray[np.float32]:
        """Every stored alignment score by item key: float32 (max key + 1,), NaN where none.

        Read once and kept until a score is stored or cleared (new items have none; deleted
        ones are masked out by ``columns.live``), so pages that filter on it stay cheap.
        """
        with self._lock:
            version = self._alignment_writes
            if self._alignment is None or self._alignment[0] != version:
                rows = self._conn.execute(
                    "SELECT key, score FROM alignment WHERE score IS NOT NULL"
                ).fetchall()
                keys = np.array([r[0] for r in rows], dtype=np.int64)
                scores = np.full(int(keys.max()) + 1 if len(keys) else 0, np.nan, np.float32)
                scores[keys] = [r[1] for r in rows]
                self._alignment = (version, scores)
            return self._alignment[1]

    def alignment(self, keys: Sequence[int] | Keys) -> NDArray[np.float32]:
        """Alignment scores of ``keys``: float32 (n,), NaN where none is stored."""
        table = self.alignment_scores()
        wanted = np.asarray(keys, dtype=np.int64)
        out = np.full(len(wanted), np.nan, dtype=np.float32)
        inside = (wanted >= 0) & (wanted < len(table))
        out[inside] = table[wanted[inside]]
        return out

    # -- reads ----------------------------------------------------------------------------
    def items(self, keys: Sequence[int]) -> list[CatalogItem]:
        """Items for ``keys``, in the same order; keys that are gone are left out."""
        return self._item_cache.get(keys)

    def term_runs(self, keys: Sequence[int]) -> TermRuns:
        """Each key's ``item_terms`` as numbers, in the same order (none for a key that is
        gone): what re-ranking reads of a page's candidates, from memory (no row is read)."""
        return self.terms.runs(keys)

    def item_summaries(self, keys: Sequence[int]) -> list[ItemSummary]:
        """Summaries of ``keys``, in the same order, gone keys left out: what a feed page
        reads of each item it shows."""
        return [ItemSummary._make(row) for row in self._summary_cache.get(keys)]

    def _read_items(self, keys: list[int]) -> dict[int, CatalogItem]:
        return {row[0]: _item_from_row(row) for row in self._read_by_key(_ITEM_COLUMNS, keys)}

    def _read_summaries(self, keys: list[int]) -> dict[int, tuple[Any, ...]]:
        # Cached as plain tuples (``ItemSummary`` fields): Python's cycle collector stops
        # scanning a tuple of strings and numbers, and the cache holds 100,000 of them.
        columns = "key, id, prompt, tags, prompt_terms, width, height, nsfw_level, source"
        return {row[0]: _summary_fields(*row) for row in self._read_by_key(columns, keys)}

    def _read_by_key(self, columns: str, keys: list[int]) -> list[Any]:
        rows = []
        for chunk, marks in _in_batches(keys):
            rows += self._read(f"SELECT {columns} FROM items WHERE key IN ({marks})", chunk)
        return rows

    def _forget(self, keys: Iterable[int]) -> None:
        """Drop cached rows that a write changed or removed."""
        keys = [int(k) for k in keys]
        self._item_cache.forget(keys)
        self._summary_cache.forget(keys)

    def item(self, item_id: str) -> CatalogItem | None:
        key = self.key_for_id(item_id)
        if key is None:
            return None
        found = self.items([key])
        return found[0] if found else None

    def iter_items(self, batch: int = 1000) -> Iterable[CatalogItem]:
        """Every item, by key order, read in batches (for exports and vocabulary building)."""
        last = -1
        while True:
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM items WHERE key > ? ORDER BY key LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _item_from_row(row)
            last = rows[-1][0]

    def keys_with_tags(self, tags: Iterable[str]) -> Keys:
        """Keys of items carrying any of ``tags`` (lower-case)."""
        wanted = sorted({t.strip().lower() for t in tags if t.strip()})
        if not wanted:
            return np.zeros(0, dtype=np.int64)
        with self._lock:
            rows = self._conn.execute(
                f"SELECT DISTINCT key FROM item_tags WHERE tag IN ({','.join('?' * len(wanted))})",
                wanted,
            ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def search(
        self,
        space: str,
        queries: NDArray[np.float32],
        k: int,
        *,
        filters: Filters | None = None,
        exclude: Collection[int] = (),
    ) -> tuple[NDArray[np.float32], Keys]:
        """k-NN in ``space`` among items ``filters`` allow, leaving out keys in ``exclude``.

        ``queries`` float32 (q, dim); returns scores (q, k) and keys (q, k), key -1 where
        fewer than k items qualify. Filters reach a FAISS store as a key mask, a Milvus one
        as an expression."""
        index = self._index(space)
        if index.filters_itself:
            return index.search(queries, k, filters=filters, exclude=exclude)
        mask = self.allowed_mask(filters) if filters is not None else None
        return index.search(queries, k, allowed=mask, exclude=exclude)

    def allowed_mask(self, filters: Filters) -> NDArray[np.bool_] | None:
        """Boolean mask over item keys of what ``filters`` allow; None when they allow all.
        Read-only: the same array serves every search with these filters until a write."""
        if filters.empty:
            return None
        revision = self.revision
        built, masks = self._masks
        if built != revision:
            masks = {}
            self._masks = (revision, masks)
        mask = masks.get(filters)
        if mask is None:
            mask = self._build_mask(filters)
            mask.flags.writeable = False
            if len(masks) >= MASK_CACHE_SIZE:  # a handful of filter sets is the usual case
                masks.clear()
            masks[filters] = mask
        return mask

    def _build_mask(self, filters: Filters) -> NDArray[np.bool_]:
        columns = self.columns
        mask = columns.live.copy()
        if filters.max_nsfw_level is not None:
            mask &= columns.nsfw_level <= filters.max_nsfw_level
        if filters.base_models:
            codes = [
                columns.base_model_codes[m]
                for m in filters.base_models
                if m in columns.base_model_codes
            ]
            mask &= np.isin(columns.base_model, np.array(codes, dtype=np.int32))
        for tag in filters.tags_required:
            has_tag = np.zeros_like(mask)
            keys = self.keys_with_tags([tag])
            has_tag[keys[keys < len(mask)]] = True
            mask &= has_tag
        if filters.tags_excluded:
            keys = self.keys_with_tags(filters.tags_excluded)
            mask[keys[keys < len(mask)]] = False
        if filters.min_alignment is not None:
            scores = self.alignment_scores()[: len(mask)]
            aligned = np.zeros_like(mask)
            aligned[: len(scores)] = scores >= filters.min_alignment  # NaN (no score): False
            mask &= aligned
        return mask

    def vectors(self, space: str, keys: Sequence[int] | Keys) -> NDArray[np.float32]:
        """Stored vectors of ``keys`` in ``space``: float32 (n, dim), L2-normalised."""
        return self._index(space).vectors(np.asarray(keys, dtype=np.int64))

    # -- merging partial catalogs (`lookalike merge`) -------------------------------------
    # Entries: (id, content hash, dump position or None, id of the item an alias stands for
    # (None for an item), source).
    @classmethod
    def open_rows(cls, path: Path) -> Catalog:
        """Open an existing catalog to read its rows only: no vector index is loaded, so a
        merge can hold many parts open at once (``search`` and ``vectors`` are unavailable;
        ``stored_vectors`` reads SQLite)."""
        manifest = cls.read_manifest(path)
        store = StoreConfig.from_manifest(manifest.get("vector_store"))
        return cls(path, _connect(path / DATABASE), manifest, IndexPolicy(), store)

    def record_dump_positions(self, positions: Sequence[tuple[str, int]]) -> None:
        """Remember (id, position) pairs: where ids stand in the dump's order (``iter_dump``)."""
        if not positions:
            return
        with self._lock, translate_disk_full("recording dump positions"), self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO dump_positions VALUES (?, ?)", positions)

    def dump_positions(self, ids: Sequence[str]) -> dict[str, int]:
        """The recorded dump positions of ``ids`` (ids without one are left out)."""
        found: dict[str, int] = {}
        for chunk, marks in _in_batches(ids):
            with self._lock:
                found.update(
                    self._conn.execute(
                        f"SELECT id, position FROM dump_positions WHERE id IN ({marks})", chunk
                    )
                )
        return found

    def iter_entries_by_id(
        self, *, aliases: bool, batch: int = 1000
    ) -> Iterable[tuple[str, str, int | None, str | None, str]]:
        """Every item (or, with ``aliases``, every duplicate alias) as an entry, by id."""
        if aliases:
            sql = (
                "SELECT d.id, i.content_hash, p.position, i.id, i.source FROM duplicates d "
                "JOIN items i ON i.key = d.of_key LEFT JOIN dump_positions p ON p.id = d.id "
                "WHERE d.id > ? ORDER BY d.id LIMIT ?"
            )
        else:
            sql = (
                "SELECT i.id, i.content_hash, p.position, NULL, i.source FROM items i "
                "LEFT JOIN dump_positions p ON p.id = i.id WHERE i.id > ? ORDER BY i.id LIMIT ?"
            )
        return self._keyset(sql, ("",), batch)  # ids are never empty

    def iter_entries_by_hash(
        self, batch: int = 1000
    ) -> Iterable[tuple[str, str, int | None, str | None, str]]:
        """Every item as an entry (see above), each followed by its aliases, by content hash."""
        pages = self._keyset_pages(
            "SELECT i.content_hash, i.key, i.id, p.position, i.source FROM items i "
            "LEFT JOIN dump_positions p ON p.id = i.id "
            "WHERE (i.content_hash, i.key) > (?, ?) ORDER BY i.content_hash, i.key LIMIT ?",
            ("", -1),
            batch,
        )
        for rows in pages:
            keys = [row[1] for row in rows]
            aliases: dict[int, list[tuple[str, int | None]]] = {}
            with self._lock:
                for alias, of_key, position in self._conn.execute(
                    "SELECT d.id, d.of_key, p.position FROM duplicates d "
                    "LEFT JOIN dump_positions p ON p.id = d.id "
                    f"WHERE d.of_key IN ({','.join('?' * len(keys))}) ORDER BY d.id",
                    keys,
                ):
                    aliases.setdefault(of_key, []).append((alias, position))
            for content_hash, key, item_id, position, source in rows:
                yield item_id, content_hash, position, None, source
                for alias, alias_position in aliases.get(key, ()):
                    yield alias, content_hash, alias_position, item_id, source

    def iter_duplicates(self, batch: int = 1000) -> Iterable[tuple[str, str, str, int, int]]:
        """Every duplicate alias as (id, id of its item, file, file size, file mtime ns), by id."""
        return self._keyset(
            "SELECT d.id, i.id, d.file, d.file_size, d.file_mtime_ns FROM duplicates d "
            "JOIN items i ON i.key = d.of_key WHERE d.id > ? ORDER BY d.id LIMIT ?",
            ("",),
            batch,
        )

    def add_duplicates(self, rows: Sequence[tuple[str, int, str, int, int]]) -> None:
        """:meth:`add_duplicate` for many (id, of_key, file, size, mtime_ns) in one transaction."""
        with self._lock, translate_disk_full("recording duplicates"), self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO duplicates VALUES (?, ?, ?, ?, ?)", rows)
            self._conn.executemany(
                "DELETE FROM skipped WHERE file = ?", ((row[2],) for row in rows)
            )

    def item_files(self, keys: Sequence[int]) -> dict[int, tuple[str, int, int]]:
        """(file, file size, file mtime ns) of the items ``keys``, by key."""
        found: dict[int, tuple[str, int, int]] = {}
        for chunk, marks in _in_batches([int(k) for k in keys]):
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT key, file, file_size, file_mtime_ns FROM items WHERE key IN ({marks})",
                    chunk,
                ).fetchall()
            found.update((key, (file, size, mtime)) for key, file, size, mtime in rows)
        return found

    def skipped_files(self) -> list[tuple[str, str, str, int, int]]:
        """Every remembered rejected file as (file, reason, detail, size, mtime_ns)."""
        with self._lock:
            return list(
                self._conn.execute(
                    "SELECT file, reason, COALESCE(detail, ''), file_size, file_mtime_ns "
                    "FROM skipped ORDER BY file"
                )
            )

    def stored_vectors(self, space: str, keys: Sequence[int]) -> NDArray[np.float32]:
        """The vectors of ``keys`` in ``space`` as SQLite stores them: float32 (n, dim)."""
        dim = int(self.manifest["encoders"][space]["dim"])
        out = np.zeros((len(keys), dim), dtype=np.float32)
        row_of = {int(k): i for i, k in enumerate(keys)}
        for chunk, marks in _in_batches([int(k) for k in keys]):
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT key, vec FROM vectors WHERE space = ? AND key IN ({marks})",
                    (space, *chunk),
                ).fetchall()
            if len(rows) != len(set(chunk)):
                raise CatalogError(f"{self.path} lacks {space} vectors of some items")
            for key, blob in rows:
                out[row_of[key]] = np.frombuffer(blob, dtype=np.float32)
        return out

    def alignment_rows(self, keys: Sequence[int]) -> dict[int, float | None]:
        """Stored alignment rows of ``keys``: a score, or None for "no prompt to score"."""
        found: dict[int, float | None] = {}
        for chunk, marks in _in_batches([int(k) for k in keys]):
            with self._lock:
                found.update(
                    self._conn.execute(
                        f"SELECT key, score FROM alignment WHERE key IN ({marks})",
                        chunk,
                    )
                )
        return found

    def iter_feedback(
        self, batch: int = 10_000
    ) -> Iterable[tuple[str, str, str | None, str, float, float]]:
        """Every stored feedback event as (event_id, session_id, user_id, image_id, dwell_ms,
        received_at), in the order they were stored."""
        for row in self._keyset(
            "SELECT rowid, event_id, session_id, user_id, image_id, dwell_ms, received_at "
            "FROM feedback WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (0,),
            batch,
        ):
            yield row[1:]

    def import_feedback(
        self, events: Sequence[tuple[str, str, str | None, str, float, float]]
    ) -> int:
        """Store events read by :meth:`iter_feedback` as they were, ignoring known event ids.
        Returns how many were new."""
        with self._lock, translate_disk_full("storing feedback"), self._conn:
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?)", events
            )
            return self._conn.total_changes - before

    def _keyset(self, sql: str, start: tuple[Any, ...], batch: int) -> Iterable[Any]:
        """The rows of :meth:`_keyset_pages`, one by one."""
        for rows in self._keyset_pages(sql, start, batch):
            yield from rows

    def _keyset_pages(self, sql: str, start: tuple[Any, ...], batch: int) -> Iterable[list[Any]]:
        """Pages of a query that takes the previous page's last row's leading columns (as many
        as ``start``, which begins the first page) and the batch size."""
        last = start
        while True:
            with self._lock:
                rows = self._conn.execute(sql, (*last, batch)).fetchall()
            if rows:
                yield rows
            if len(rows) < batch:
                return
            last = tuple(rows[-1][: len(start)])

    # -- internals ------------------------------------------------------------------------
    def _index(self, space: str) -> VectorStore:
        try:
            return self.indexes[space]
        except KeyError:
            raise CatalogError(
                f"This catalog has no {space!r} space (it has {', '.join(self.spaces)}). "
                "Rebuild it with a profile that includes it, e.g. `--profile default`."
            ) from None

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a query on the read-only connection (committed data only)."""
        with self._read_lock:
            if self._reader is None:
                self._reader = _connect_reader(self.path / DATABASE)
            return self._reader.execute(sql, params).fetchall()

    def _scalar(self, sql: str) -> int:
        with self._lock:
            return int(self._conn.execute(sql).fetchone()[0])

    def _vector_chunks(
        self, space: str, size: int = 65_536
    ) -> Iterator[tuple[Keys, NDArray[np.float32]]]:
        """A space's (keys, vectors) from SQLite, in key order, ``size`` rows at a time."""
        last = -1
        while True:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT key, vec FROM vectors WHERE space = ? AND key > ? ORDER BY key LIMIT ?",
                    (space, last, size),
                ).fetchall()
            if not rows:
                return
            keys = np.array([r[0] for r in rows], dtype=np.int64)
            blob = b"".join(r[1] for r in rows)
            yield keys, np.frombuffer(blob, dtype=np.float32).reshape(len(rows), -1)
            last = int(keys[-1])

    def _stores_filter(self) -> bool:
        """True when a store filters by itself and so must be told items' attributes."""
        return any(index.filters_itself for index in self.indexes.values())

    def _new_attributes(self, items: Sequence[NewItem]) -> list[ItemAttributes]:
        """Attributes of items just added (a new or replaced item has no alignment yet)."""
        return [
            ItemAttributes(i.record.nsfw_level, i.record.base_model, tuple(i.record.tags))
            for i in items
        ]

    def _attributes(self, keys: Sequence[int]) -> list[ItemAttributes]:
        """Stored attributes of ``keys`` (all must be items), in the same order."""
        found: dict[int, ItemAttributes] = {}
        for chunk, marks in _in_batches([int(k) for k in keys]):
            with self._lock:
                rows = self._conn.execute(
                    f"SELECT i.key, i.nsfw_level, i.base_model, i.tags, a.score FROM items i "
                    f"LEFT JOIN alignment a ON a.key = i.key WHERE i.key IN ({marks})",
                    chunk,
                ).fetchall()
            for key, level, base_model, tags, score in rows:
                found[key] = ItemAttributes(level, base_model, tuple(json.loads(tags)), score)
        return [found[int(k)] for k in keys]

    def _sync_attributes(self, keys: Sequence[int]) -> None:
        """Tell the stores that filter by themselves what changed about these items."""
        if not self._stores_filter() or len(keys) == 0:
            return
        wanted = np.asarray(keys, dtype=np.int64)
        attributes = self._attributes(wanted.tolist())
        for space, index in self.indexes.items():
            if index.filters_itself:
                index.set_attributes(wanted, attributes)
                self._dirty.add(space)

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE state SET value = value + 1 WHERE name = 'generation'")

    def _keys_by_id(self, ids: Sequence[str]) -> dict[str, int]:
        """id -> key of the stored items among ``ids`` (on the write connection)."""
        found: dict[str, int] = {}
        for chunk, marks in _in_batches(ids):
            sql = f"SELECT id, key FROM items WHERE id IN ({marks})"
            found.update((i, int(k)) for i, k in self._conn.execute(sql, chunk))
        return found

    def _upsert_item(self, item: NewItem, now: float, known: Mapping[str, int]) -> int:
        """Insert or update the item's row (``known``: id -> key of stored items); the
        caller writes its tags and clears its skip and alias rows."""
        values = _record_values(item.record)
        values.update(
            file=item.file,
            content_hash=item.content_hash,
            file_size=item.file_size,
            file_mtime_ns=item.file_mtime_ns,
            width=item.width,
            height=item.height,
            source=item.source,
        )
        if item.extra_meta:
            values["meta"] = json.dumps({**item.record.meta, **item.extra_meta}, default=str)
        key = known.get(item.record.id)
        if key is not None:
            self._conn.execute(
                f"UPDATE items SET {', '.join(f'{c} = ?' for c in values)} WHERE key = ?",
                (*values.values(), key),
            )
            self._conn.execute("DELETE FROM alignment WHERE key = ?", (key,))
            self._alignment_writes += 1
        else:
            columns = ["id", *values, "added_at"]
            cursor = self._conn.execute(
                f"INSERT INTO items ({', '.join(columns)}) VALUES "
                f"({', '.join('?' * len(columns))})",
                (item.record.id, *values.values(), now),
            )
            key = int(cursor.lastrowid or 0)
        return key

    def _set_tags(self, tags: Mapping[int, Sequence[str]]) -> None:
        """Replace the tag rows of each key with its tags."""
        self._conn.executemany("DELETE FROM item_tags WHERE key = ?", ((k,) for k in tags))
        self._conn.executemany(
            "INSERT OR IGNORE INTO item_tags (tag, key) VALUES (?, ?)",
            ((tag, key) for key, item_tags in tags.items() for tag in item_tags),
        )

    def _load_columns(self) -> None:
        with self._lock:
            for key, level, base_model in self._conn.execute(
                "SELECT key, nsfw_level, base_model FROM items"
            ):
                self.columns.set(key, level, base_model)
        terms = TermColumn.load(self.path / TERMS_FILE, self._terms_stamp(self.generation()))
        if terms is None:  # none yet (an older catalog), or of another generation: rebuild
            log.info("reading the items' terms from SQLite (once; ~20 s per million items)")
            with self._lock:
                rows = self._conn.execute(
                    "SELECT key, tags, prompt_terms, prompt FROM items ORDER BY key"
                )
                terms = TermColumn.from_rows(
                    (key, item_terms(orjson.loads(tags), _decoded_terms(parsed, prompt)))
                    for key, tags, parsed, prompt in rows
                )
        self.terms = terms  # a rebuilt column is dirty: the next checkpoint writes it

    @staticmethod
    def _terms_stamp(generation: int) -> tuple[int, int]:
        # Prompt terms parsed under other rules are stale too (``_parse_prompt_terms``).
        return (generation, PROMPT_TERMS_VERSION)

    def _load_indexes(self) -> None:
        generation = self.generation()
        for space, entry in self.manifest["encoders"].items():
            info = self.manifest["spaces"].get(space, {})
            path = self.path / INDEX_DIR / f"{space}.faiss"
            dim = int(entry["dim"])
            # A FAISS snapshot of an older generation is not worth reading; rebuild instead.
            snapshot = path if info.get("generation") == generation else None
            index: VectorStore | None = None
            try:
                index = open_store(self.store, self.path, space, dim, self.policy, snapshot, info)
            except (RuntimeError, ValueError, OSError) as exc:
                log.warning(
                    "the %s index is unreadable (%s); rebuilding it from SQLite", space, exc
                )
            stale = index is None or (
                info.get("generation") != generation or len(index) != self._vector_count(space)
            )
            if index is None:
                index = new_store(self.store, self.path, space, dim, self.policy)
            elif stale:
                log.warning("the %s index is out of step with SQLite; rebuilding it", space)
            elif index.needs_retype():  # e.g. written before the policy's limits changed
                log.warning(
                    "the %s index (%s) does not suit its %d vectors; rebuilding it",
                    space,
                    index.info.kind,
                    len(index),
                )
                stale = True
            self.indexes[space] = index
            if stale:
                self._rebuild_space(space)
                self._dirty.add(space)
        if self._dirty or self.terms.dirty:
            try:
                self.checkpoint()
            except (DiskFullError, PermissionError) as exc:
                # The rebuilt indexes serve from memory; the snapshots stay dirty and are
                # written by the next checkpoint. A full disk or a read-only directory (an
                # upgraded catalog gains its terms file at its first open) must not make a
                # catalog unopenable.
                log.warning("could not save the rebuilt indexes: %s", exc)

    def _vector_count(self, space: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM vectors WHERE space = ?", (space,))
            return int(row.fetchone()[0])

    def _rebuild_space(self, space: str) -> None:
        """Rebuild a space's vector store from the vectors (and attributes) stored in SQLite.

        A FAISS space changes type with its size (see ``faiss_store_for``); a compressed one
        is built from chunks streamed out of SQLite, never holding every vector at once."""
        index = self.indexes[space]
        if self.store.kind == "faiss":
            count = self._vector_count(space)
            index = self.indexes[space] = faiss_store_for(count, index, self.path, self.policy)
            if isinstance(index, CompressedIndex):
                log.info("building the compressed %s index over %d vectors", space, count)
                index.build(self._vector_chunks(space))
                return
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, vec FROM vectors WHERE space = ? ORDER BY key", (space,)
            ).fetchall()
        keys = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.zeros((len(rows), index.dim), dtype=np.float32)
        for i, (_, blob) in enumerate(rows):
            vectors[i] = np.frombuffer(blob, dtype=np.float32)
        log.info("building the %s index over %d vectors", space, len(keys))
        attributes = self._attributes(keys.tolist()) if index.filters_itself else None
        index.rebuild(keys, vectors, attributes)


# Where a file may be known from, first match wins: (kind, query -> id, hash, size, mtime).
_IN_BATCH = 500  # values per ``IN (...)``: well under SQLite's limit on bound parameters


def _in_batches(values: Sequence[Any]) -> Iterator[tuple[list[Any], str]]:
    """``values`` in slices for ``IN (...)`` queries, each with its ``?,?,...`` marks."""
    for start in range(0, len(values), _IN_BATCH):
        chunk = list(values[start : start + _IN_BATCH])
        yield chunk, ",".join("?" * len(chunk))


# (kind, query) in priority order; each row is (file, a key ordering rows of one file, state).
_FILE_STATE_QUERIES = (
    (
        "item",
        "SELECT file, key, id, content_hash, file_size, file_mtime_ns FROM items "
        "WHERE file IN ({marks})",
    ),
    (
        "duplicate",
        "SELECT d.file, d.rowid, d.id, i.content_hash, d.file_size, d.file_mtime_ns "
        "FROM duplicates d JOIN items i ON i.key = d.of_key WHERE d.file IN ({marks})",
    ),
    (
        "skipped",
        "SELECT file, 0, reason, NULL, file_size, file_mtime_ns FROM skipped "
        "WHERE file IN ({marks})",
    ),
)

_ITEM_COLUMNS = (
    "key, id, file, content_hash, width, height, prompt, negative_prompt, tags, nsfw_level, "
    "base_model, model_name, created_at, username, url, stats, meta, source, prompt_terms"
)


def _decoded_terms(stored: str | None, prompt: str | None) -> tuple[str, ...]:
    # NULL only while an upgraded catalog is being opened by another process
    return tuple(orjson.loads(stored) if stored is not None else prompt_terms(prompt))


def _summary_fields(
    key: int,
    item_id: str,
    prompt: str | None,
    tags: str,
    parsed: str | None,
    width: int | None,
    height: int | None,
    nsfw_level: int,
    source: str,
) -> tuple[Any, ...]:
    """An ``ItemSummary``'s fields from its columns."""
    tag_tuple, terms = tuple(orjson.loads(tags)), _decoded_terms(parsed, prompt)
    return (key, item_id, prompt, tag_tuple, terms, width, height, nsfw_level, source)


def _record_terms(record: DumpRecord) -> tuple[str, ...]:
    return item_terms(record.tags, prompt_terms(record.prompt))


def _item_from_row(row: Sequence[Any]) -> CatalogItem:
    return CatalogItem(
        key=row[0],
        id=row[1],
        file=row[2],
        content_hash=row[3],
        width=row[4],
        height=row[5],
        prompt=row[6],
        negative_prompt=row[7],
        tags=tuple(orjson.loads(row[8])),  # orjson: a page decodes a few hundred of these
        nsfw_level=row[9],
        base_model=row[10],
        model_name=row[11],
        created_at=row[12],
        username=row[13],
        url=row[14],
        stats_json=row[15],
        meta_json=row[16],
        source=row[17],
        prompt_terms=_decoded_terms(row[18], row[6]),
    )


def _record_values(record: DumpRecord) -> dict[str, Any]:
    """The metadata columns a dump record fills (not the file columns)."""
    return {
        "prompt": record.prompt,
        "prompt_terms": json.dumps(prompt_terms(record.prompt)),
        "negative_prompt": record.negative_prompt,
        "tags": json.dumps(list(record.tags)),
        "nsfw_level": record.nsfw_level,
        "base_model": record.base_model,
        "model_name": record.model_name,
        "created_at": record.created_at,
        "username": record.username,
        "url": record.url,
        "stats": json.dumps(record.stats, sort_keys=True, default=str),
        "meta": json.dumps(record.meta, sort_keys=True, default=str),
    }


def _connect(path: Path) -> sqlite3.Connection:
    try:
        with translate_disk_full(f"opening {path}"):
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 10000")
            _migrate(conn)
            _parse_prompt_terms(conn)
    except sqlite3.DatabaseError as exc:
        raise CatalogError(f"Cannot open catalog database {path}: {exc}") from exc
    conn.isolation_level = "DEFERRED"  # `with conn:` now wraps each write in a transaction
    return conn


def _connect_reader(path: Path) -> sqlite3.Connection:
    # Autocommit (isolation_level None): every query reads the latest commit.
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def _parse_prompt_terms(conn: sqlite3.Connection) -> None:
    """Store the prompt terms of rows that have none (a catalog from before migration 5), and
    of every row when they were parsed under another ``PROMPT_TERMS_VERSION``.

    The state row ``prompt_terms_version`` is written once every row is parsed, so an open
    after that reads one row and scans nothing. The parse runs once after an upgrade (about
    30 s per million items on the dev box), committed in chunks in key order: an interrupted
    run resumes at the next open."""
    state = conn.execute("SELECT value FROM state WHERE name = 'prompt_terms_version'").fetchone()
    if state is not None and state[0] == PROMPT_TERMS_VERSION:
        return
    if state is not None:  # parsed under other rules: all of it again
        conn.executescript(
            "BEGIN;\nUPDATE items SET prompt_terms = NULL;\n"
            "DELETE FROM state WHERE name = 'prompt_terms_version';\nCOMMIT;"
        )
    last, done = -1, 0
    while True:
        rows = conn.execute(
            "SELECT key, prompt FROM items WHERE key > ? AND prompt_terms IS NULL "
            "ORDER BY key LIMIT ?",
            (last, PROMPT_TERMS_CHUNK),
        ).fetchall()
        if not rows:
            break
        if not done:
            log.info("parsing the prompts of the catalog's items (once, after an upgrade)")
        conn.execute("BEGIN")
        conn.executemany(
            "UPDATE items SET prompt_terms = ? WHERE key = ?",
            [(json.dumps(prompt_terms(prompt)), key) for key, prompt in rows],
        )
        conn.execute("COMMIT")
        last, done = int(rows[-1][0]), done + len(rows)
        log.info("parsed the prompts of %d items", done)
    conn.execute(
        "INSERT OR REPLACE INTO state VALUES ('prompt_terms_version', ?)", (PROMPT_TERMS_VERSION,)
    )


def _migrate(conn: sqlite3.Connection) -> None:
    done = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number, (name, sql) in enumerate(MIGRATIONS[done:], start=done + 1):
        log.debug("catalog migration %d: %s", number, name)
        conn.executescript(f"BEGIN;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;")


def _check_encoders(
    path: Path, recorded: Mapping[str, Mapping[str, Any]], expected: Mapping[str, EncoderSpec]
) -> None:
    wanted = {space: encoder_entry(spec) for space, spec in expected.items()}
    if dict(recorded) == wanted:
        return
    lines = []
    for space in sorted(set(recorded) | set(wanted)):
        have, want = recorded.get(space), wanted.get(space)
        if have != want:
            lines.append(f"  {space}: catalog has {_describe(have)}, asked for {_describe(want)}")
    raise EncoderMismatchError(
        f"The catalog at {path} was built with other encoders:\n"
        + "\n".join(lines)
        + "\nUse the profile and models it was built with, or index into a new --catalog."
    )


def _describe(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "no such space"
    return f"{entry['name']} ({entry['model']}@{entry['revision']}, dim {entry['dim']})"
