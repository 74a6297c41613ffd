"""Every item's terms (``item_terms``) by key, in memory: what a feed page reads of each of the
~100 candidates it re-ranks. Read from SQLite, a candidate's terms cost ~30 us (a B-tree walk
and two JSON decodes), and a steered page's candidates are mostly new to the process.

The column is a snapshot file plus the keys written since it was taken. The file numbers the
catalog's distinct terms (its vocabulary, stored once as UTF-8) and holds each key's run of
term numbers; it is memory-mapped, so the worker processes of one server share its pages.
Reading gathers the numbers with numpy (``runs``), so that re-ranking can do its per-term work
once per distinct number; names are decoded once per process and shared. Writes go to a dict
of changed keys; ``save`` folds them into a new file, stamped with the catalog generation (and
``PROMPT_TERMS_VERSION``) that it reflects, like the FAISS snapshots: a file with another
stamp is stale, and the catalog rebuilds the column from SQLite.
"""

from __future__ import annotations

import mmap
import struct
import threading
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from numpy.typing import NDArray

from indexer.storage import atomic_write

_MAGIC = b"LKTERMS2"
# magic, generation, prompt-terms version, keys, term numbers, vocabulary size, its UTF-8 bytes
_HEADER = struct.Struct("<8sqqqqqq")
MAX_DECODED = 1 << 18  # decoded names kept per process; past it they are decoded afresh

Terms = tuple[str, ...]


@dataclass(frozen=True)
class TermRuns:
    """Some items' terms as numbers: item i's are the next ``counts[i]`` of ``numbers``, and
    ``names`` names numbers. ``vocabulary`` owns the numbering (a ``TermColumn``, whose numbers
    keep their meaning, so per-term work can be cached by number), or is None for a numbering
    made up for one call (``of``)."""

    counts: NDArray[np.int64]
    numbers: NDArray[np.int64]
    names: Callable[[list[int]], list[str]]
    vocabulary: object | None = None

    @classmethod
    def of(cls, items: Sequence[Sequence[str]]) -> TermRuns:
        """Runs of terms given as strings, numbered for this call only."""
        by_name: dict[str, int] = {}
        flat = [by_name.setdefault(t, len(by_name)) for terms in items for t in terms]
        names = list(by_name)
        return cls(
            np.fromiter(map(len, items), np.int64, len(items)),
            np.array(flat, dtype=np.int64),
            lambda numbers: [names[n] for n in numbers],
        )

    def __len__(self) -> int:
        return len(self.counts)

    def tuples(self) -> list[Terms]:
        """Each item's terms as a tuple of names."""
        names = self.names(self.numbers.tolist())
        ends = np.cumsum(self.counts).tolist()
        return [tuple(names[e - c : e]) for e, c in zip(ends, self.counts.tolist(), strict=True)]


class TermColumn:
    """Terms by item key (keys never written have none). Thread-safe."""

    def __init__(self) -> None:
        # The snapshot: key k's term numbers are numbers[offsets[k]:offsets[k + 1]], and term
        # n's name is vocab[vocab_offsets[n]:vocab_offsets[n + 1]] for n < len(vocab_offsets) - 1.
        self._offsets = np.zeros(1, dtype=np.int64)
        self._numbers = np.zeros(0, dtype=np.int32)
        self._vocab_offsets = np.zeros(1, dtype=np.int64)
        self._vocab: bytes | mmap.mmap = b""
        # Every number's name, decoded once and shared by every read; numbers past the
        # snapshot's vocabulary name terms first written since (always held).
        self._names: list[str | None] = []
        self._decoded = 0
        self._by_name: dict[str, int] | None = None  # name -> number, built by the first write
        self._changed: dict[int, NDArray[np.int32]] = {}  # keys written since the snapshot
        self.stamp: tuple[int, int] | None = None  # (generation, prompt-terms version) of it
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()

    # -- building and persistence -------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, Terms]]) -> TermColumn:
        """A column holding ``rows`` of (key, terms), keys ascending (e.g. read from SQLite
        in key order); it has no file yet (``dirty``)."""
        by_name: dict[str, int] = {}
        numbers, ends = array("i"), array("q", [0])
        for key, terms in rows:
            if key < len(ends) - 1:
                raise ValueError(f"keys must ascend: {key} after {len(ends) - 2}")
            ends.extend([len(numbers)] * (key + 1 - len(ends)))  # keys between: no terms
            numbers.extend(by_name.setdefault(t, len(by_name)) for t in terms)
            ends.append(len(numbers))
        column = cls()
        names = list(by_name)
        encoded = [name.encode() for name in names]
        column._offsets = np.frombuffer(ends, dtype=np.int64).copy()
        column._numbers = np.frombuffer(numbers, dtype=np.int32).copy()
        column._vocab_offsets = _ends_of(encoded)
        column._vocab = b"".join(encoded)
        column._names, column._by_name = list(names), by_name
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
        magic, generation, version, keys, count, terms, vocab_bytes = _HEADER.unpack_from(mapped)
        at = _HEADER.size
        numbers_at = at + 8 * (keys + 1) + 8 * (terms + 1)
        vocab_at = numbers_at + 4 * count
        if (
            magic != _MAGIC
            or (generation, version) != stamp
            or min(keys, count, terms) < 0
            or size != vocab_at + vocab_bytes
        ):
            return None
        offsets = np.frombuffer(mapped, np.int64, keys + 1, at)
        vocab_offsets = np.frombuffer(mapped, np.int64, terms + 1, at + 8 * (keys + 1))
        numbers = np.frombuffer(mapped, np.int32, count, numbers_at)
        if not (
            _is_run_table(offsets, count)
            and _is_run_table(vocab_offsets, vocab_bytes)
            and (count == 0 or (numbers.min() >= 0 and numbers.max() < terms))
        ):
            return None
        column = cls()
        column._offsets, column._numbers = offsets, numbers
        # Name offsets into the mapping itself, so that reading a name is one slice.
        column._vocab_offsets, column._vocab = vocab_offsets + vocab_at, mapped
        column._names = [None] * terms
        column.stamp = stamp
        return column

    def save(self, path: Path, stamp: tuple[int, int]) -> None:
        """Write the column (snapshot and changes) to ``path`` stamped ``stamp``, atomically,
        and serve from the new file from then on."""
        with self._save_lock:
            with self._lock:
                offsets, numbers, changed = self._offsets, self._numbers, dict(self._changed)
                known = len(self._vocab_offsets) - 1
                new_names = cast(list[str], self._names[known:])  # written since: all held
            new_offsets, new_numbers = _spliced(offsets, numbers, changed)
            encoded = [name.encode() for name in new_names]
            base, old_end = int(self._vocab_offsets[0]), int(self._vocab_offsets[-1])
            vocab_offsets = (
                np.concatenate([self._vocab_offsets[:-1], old_end + _ends_of(encoded)]) - base
            )

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    sizes = (len(new_offsets) - 1, len(new_numbers), len(vocab_offsets) - 1)
                    f.write(_HEADER.pack(_MAGIC, *stamp, *sizes, int(vocab_offsets[-1])))
                    f.write(new_offsets.tobytes())
                    f.write(vocab_offsets.tobytes())
                    f.write(new_numbers.tobytes())
                    f.write(self._vocab[base:old_end])
                    for name in encoded:
                        f.write(name)

            atomic_write(path, write)
            fresh = TermColumn.load(path, stamp)
            if fresh is None:  # not expected: the file was just written whole
                raise OSError(f"{path} was written but does not read back")
            with self._lock:
                self._offsets, self._numbers = fresh._offsets, fresh._numbers
                self._vocab_offsets, self._vocab = fresh._vocab_offsets, fresh._vocab
                self.stamp = stamp
                for key, row in changed.items():  # keep what was written during the save
                    if self._changed.get(key) is row:
                        del self._changed[key]

    @property
    def dirty(self) -> bool:
        """Whether the column holds anything its file (if any) does not."""
        return self.stamp is None or bool(self._changed)

    # -- writing and reading --------------------------------------------------------------
    def set(self, key: int, terms: Terms) -> None:
        with self._lock:
            by_name, names = self._name_numbers(), self._names
            row = []
            for term in terms:
                number = by_name.get(term)
                if number is None:
                    number = by_name[term] = len(names)
                    names.append(term)
                row.append(number)
            self._changed[int(key)] = np.array(row, dtype=np.int32)

    def clear(self, key: int) -> None:
        self.set(key, ())

    def get(self, keys: Sequence[int]) -> list[Terms]:
        """Terms of ``keys``, in the same order (empty for a key never written)."""
        return self.runs(keys).tuples()

    def runs(self, keys: Sequence[int]) -> TermRuns:
        """Terms of ``keys`` as numbers of this column's vocabulary (see ``TermRuns``)."""
        with self._lock:
            offsets, numbers, changed = self._offsets, self._numbers, self._changed
            # Every key's run gathered at once; a key outside the snapshot has an empty one.
            at = np.asarray(keys, dtype=np.int64).reshape(-1)
            inside = (at >= 0) & (at < len(offsets) - 1)
            starts = counts = np.zeros(len(at), dtype=np.int64)
            if inside.any():  # then offsets has a second entry for the keys outside to read
                at = np.where(inside, at, 0)
                starts = np.where(inside, offsets[at], 0)
                counts = np.where(inside, offsets[at + 1], 0) - starts
            if changed and any(int(k) in changed for k in keys):  # written since: theirs
                spans = zip(map(int, keys), starts.tolist(), counts.tolist(), strict=True)
                rows = [changed[k] if k in changed else numbers[s : s + c] for k, s, c in spans]
                counts = np.fromiter(map(len, rows), np.int64, len(rows))
                flat = np.concatenate([np.zeros(0, np.int32), *rows])
            else:
                firsts = np.cumsum(counts) - counts
                flat = numbers[np.repeat(starts - firsts, counts) + np.arange(int(counts.sum()))]
        return TermRuns(counts, flat.astype(np.int64), self.names, self)

    def names(self, numbers: list[int]) -> list[str]:
        """The names of ``numbers``, each decoded once and then shared."""
        with self._lock:
            names = self._names
            got = list(map(names.__getitem__, numbers))
            if None not in got:
                return cast(list[str], got)
            known = len(self._vocab_offsets) - 1
            if self._decoded > MAX_DECODED:  # a vast vocabulary: do not keep all of it decoded
                names[:known] = [None] * known
                self._decoded = 0
            vocab, ends = self._vocab, self._vocab_offsets
            for n in set(numbers):
                if names[n] is None:
                    names[n] = vocab[int(ends[n]) : int(ends[n + 1])].decode()
                    self._decoded += 1
            return cast(list[str], list(map(names.__getitem__, numbers)))

    # -- internals ------------------------------------------------------------------------
    def _name_numbers(self) -> dict[str, int]:
        """name -> number over the whole vocabulary (lock held), decoded the first time a
        write needs it: a process that only reads never builds it."""
        if self._by_name is None:
            self._by_name = {}
            for n, name in enumerate(self._names):
                if name is None:
                    start, end = self._vocab_offsets[n : n + 2].tolist()
                    name = self._names[n] = self._vocab[start:end].decode()
                self._by_name[name] = n
        return self._by_name


def _ends_of(encoded: list[bytes]) -> NDArray[np.int64]:
    """Offsets (n + 1,) of ``encoded`` laid end to end, from 0."""
    ends = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=ends[1:])
    return ends


def _is_run_table(offsets: NDArray[np.int64], total: int) -> bool:
    return bool(offsets[0] == 0 and offsets[-1] == total and (np.diff(offsets) >= 0).all())


def _spliced(
    offsets: NDArray[np.int64], numbers: NDArray[np.int32], rows: dict[int, NDArray[np.int32]]
) -> tuple[NDArray[np.int64], NDArray[np.int32]]:
    """The run table and numbers with ``rows`` (key -> its new run) put in place."""
    lengths = np.diff(offsets)
    keys = max(len(lengths), max(rows, default=-1) + 1)
    lengths = np.concatenate([lengths, np.zeros(keys - len(lengths), dtype=np.int64)])
    for key, row in rows.items():
        lengths[key] = len(row)
    new_offsets = np.zeros(keys + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    new_numbers = np.empty(int(new_offsets[-1]), dtype=np.int32)
    old_keys, done = len(offsets) - 1, 0
    # Unchanged keys' runs are copied in blocks between the changed keys.
    for key in [*sorted(rows), keys]:
        stop = min(key, old_keys)
        if done < stop:
            block = numbers[int(offsets[done]) : int(offsets[stop])]
            new_numbers[int(new_offsets[done]) : int(new_offsets[done]) + len(block)] = block
        if key in rows:
            new_numbers[int(new_offsets[key]) : int(new_offsets[key + 1])] = rows[key]
        done = key + 1
    return new_offsets, new_numbers
