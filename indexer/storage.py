"""Crash-safe file writes and disk-full translation, shared by everything that writes a catalog."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from indexer.errors import DiskFullError

# No write takes this long: a temporary file this old was left by a killed process.
STALE_TEMP_S = 3600.0


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX needs the directory fsynced too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` so that a crash leaves either the old file or the new one, never a mix.

    ``write`` receives a temporary path in the same directory and fills it; the file is then
    fsynced and renamed over ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with translate_disk_full(f"writing {path}"):
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale_temps(directory: Path) -> None:
    """Delete the temporary files that killed writes left in ``directory``.

    A SIGKILL skips ``atomic_write``'s cleanup, so each crash during a write would leak one
    (as large as a FAISS snapshot). Only old ones go: a concurrent writer's file is never touched.
    """
    cutoff = time.time() - STALE_TEMP_S
    for leftover in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if leftover.is_file() and leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def translate_disk_full(what: str) -> Iterator[None]:
    """Turn ENOSPC / SQLite's "disk is full" into one DiskFullError naming the operation."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"No space left on device while {what}; the previous catalog state is intact. "
                "Free some space and re-run: indexing resumes where it stopped."
            ) from exc
        raise
    except sqlite3.OperationalError as exc:
        # SQLITE_FULL reads "database or disk is full"; a full disk met while creating the WAL's
        # shared-memory file reads only "disk I/O error" (SQLITE_IOERR_SHMSIZE).
        name = getattr(exc, "sqlite_errorname", "")
        if "full" in str(exc).lower() or name == "SQLITE_IOERR_SHMSIZE":
            raise DiskFullError(
                f"No space left on device while {what}; the last transaction was rolled back "
                "and the previous catalog state is intact."
            ) from exc
        raise
