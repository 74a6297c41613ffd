"""Every item's terms (``item_terms``) by key, in memory: what a feed page reads of each of the
~100 candidates it re-ranks. Read from SQLite, a candidate's terms cost ~20 us (a B-tree walk
and two JSON decodes), and a steered page's candidates are mostly new to the process; here they
cost about 1 us.

The column is a snapshot file plus the keys written since it was taken. The file holds every
key's terms as one run of UTF-8 text (terms joined by ``SEPARATOR``) and the offset of each
key's run; it is memory-mapped, so the worker processes of one server share its pages. Writes
go to a dict of changed keys; ``save`` folds them into a new file, stamped with the catalog
generation (and ``PROMPT_TERMS_VERSION``) that it reflects, like the FAISS snapshots: a file
with another stamp is stale, and the catalog rebuilds the column from SQLite.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from indexer.storage import atomic_write

SEPARATOR = "\x1f"  # white space to ``normalise_term``, so never inside a term
_MAGIC = b"LKTERMS1"
_HEADER = struct.Struct("<8sqqqq")  # magic, generation, prompt-terms version, keys, text bytes

Terms = tuple[str, ...]


class TermColumn:
    """Terms by item key (keys never written have none). Thread-safe."""

    def __init__(
        self,
        offsets: NDArray[np.int64] | None = None,
        text: bytes | mmap.mmap = b"",
        stamp: tuple[int, int] | None = None,
    ) -> None:
        # The snapshot: key k's text is text[offsets[k]:offsets[k + 1]].
        self._offsets = offsets if offsets is not None else np.zeros(1, dtype=np.int64)
        self._text = text
        self.stamp = stamp  # (generation, prompt-terms version) of the file read, if any
        self._changed: dict[int, bytes] = {}  # key -> encoded terms, written since
        self._lock = threading.Lock()

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, Terms]]) -> TermColumn:
        """A column holding ``rows`` of (key, terms), e.g. read from SQLite."""
        column = cls()
        for key, terms in rows:
            column.set(key, terms)
        return column

    @classmethod
    def load(cls, path: Path, stamp: tuple[int, int]) -> TermColumn | None:
        """The snapshot at ``path`` if it is whole and stamped ``stamp``; else None."""
        try:
            with open(path, "rb") as f:
                if (size := f.seek(0, 2)) < _HEADER.size:
                    return None
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        magic, generation, version, keys, text_bytes = _HEADER.unpack_from(mapped)
        start = _HEADER.size + 8 * (keys + 1)
        if magic != _MAGIC or (generation, version) != stamp or size != start + text_bytes:
            mapped.close()
            return None
        offsets = np.frombuffer(mapped, dtype=np.int64, count=keys + 1, offset=_HEADER.size)
        if offsets[0] != 0 or offsets[-1] != text_bytes or (np.diff(offsets) < 0).any():
            return None
        # Offsets into the text part of the mapping; the file's own stay as written.
        return cls(offsets + start, mapped, stamp)

    def save(self, path: Path, stamp: tuple[int, int]) -> None:
        """Write the column (snapshot and changes) to ``path`` stamped ``stamp``, atomically,
        and serve from the new file from then on."""
        with self._lock:
            offsets, text, changed = self._offsets, self._text, dict(self._changed)
        lengths = np.diff(offsets)
        keys = max(len(lengths), max(changed, default=-1) + 1)
        lengths = np.concatenate([lengths, np.zeros(keys - len(lengths), dtype=np.int64)])
        order = sorted(changed)
        for key in order:
            lengths[key] = len(changed[key])
        new_offsets = np.zeros(keys + 1, dtype=np.int64)
        np.cumsum(lengths, out=new_offsets[1:])

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                header = (_MAGIC, *stamp, keys, int(new_offsets[-1]))
                f.write(_HEADER.pack(*header))
                f.write(new_offsets.tobytes())
                # Unchanged keys' text is copied in runs between the changed keys.
                old_keys, done = len(offsets) - 1, 0
                for key in order:
                    if done < min(key, old_keys):
                        f.write(text[int(offsets[done]) : int(offsets[min(key, old_keys)])])
                    f.write(changed[key])
                    done = key + 1
                if done < old_keys:
                    f.write(text[int(offsets[done]) : int(offsets[old_keys])])

        atomic_write(path, write)
        fresh = TermColumn.load(path, stamp)
        if fresh is None:  # not expected: the file was just written whole
            raise OSError(f"{path} was written but does not read back")
        with self._lock:
            self._offsets, self._text, self.stamp = fresh._offsets, fresh._text, stamp
            for key, encoded in changed.items():  # keep what was written during the save
                if self._changed.get(key) is encoded:
                    del self._changed[key]

    @property
    def dirty(self) -> bool:
        """Whether keys were written since the snapshot."""
        return bool(self._changed)

    def set(self, key: int, terms: Terms) -> None:
        encoded = SEPARATOR.join(terms).encode()
        with self._lock:
            self._changed[int(key)] = encoded

    def clear(self, key: int) -> None:
        self.set(key, ())

    def get(self, keys: Sequence[int]) -> list[Terms]:
        """Terms of ``keys``, in the same order (empty for a key never written)."""
        with self._lock:
            offsets, text, changed = self._offsets, self._text, self._changed
            end = len(offsets) - 1
            out: list[Terms] = []
            for key in keys:
                encoded = changed.get(key)
                if encoded is None:
                    if not 0 <= key < end:
                        out.append(())
                        continue
                    encoded = text[offsets[key] : offsets[key + 1]]
                out.append(tuple(encoded.decode().split(SEPARATOR)) if encoded else ())
            return out
