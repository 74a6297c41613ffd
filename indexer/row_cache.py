"""A bounded cache of SQLite rows by item key, safe against writes that race with reads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

Row = TypeVar("Row")


class RowCache(Generic[Row]):
    """Decoded rows by item key; the least recently used go past ``size``.

    ``read(keys)`` fetches the missing ones (keys that are gone are absent from its answer),
    outside the lock so that readers overlap. ``forget(keys)`` is called by a write that
    changed or removed those rows: rows a reader fetched while it ran are returned to that
    reader but not kept, since they may predate the write.
    """

    def __init__(self, size: int, read: Callable[[list[int]], dict[int, Row]]) -> None:
        self._size = size
        self._read = read
        self._rows: OrderedDict[int, Row] = OrderedDict()
        self._lock = threading.Lock()
        self._version = 0

    def get(self, keys: Sequence[int]) -> list[Row]:
        """Rows for ``keys``, in the same order; keys that are gone are left out."""
        if len(keys) == 0:
            return []
        wanted = [int(k) for k in keys]
        rows = self._rows
        with self._lock:
            version = self._version
            missing = [k for k in wanted if k not in rows]
        fetched = self._read(missing) if missing else {}
        with self._lock:
            if version == self._version:  # no write dropped rows meanwhile
                rows.update(fetched)
            found = []
            for k in wanted:
                row = rows.get(k)
                if row is not None:
                    rows.move_to_end(k)
                else:
                    row = fetched.get(k)
                if row is not None:
                    found.append(row)
            while len(rows) > self._size:
                rows.popitem(last=False)
        return found

    @property
    def version(self) -> int:
        """How many ``forget`` calls (writes) this cache has seen."""
        return self._version

    def forget(self, keys: Iterable[int]) -> None:
        with self._lock:
            self._version += 1
            for key in keys:
                self._rows.pop(int(key), None)
