"""Domain errors of the indexer. Only the CLI and the service turn them into exit codes / HTTP."""

from __future__ import annotations

from typing import Any


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with its attributes rather than through __init__ (whose arguments differ
        # from ``args`` in subclasses): errors cross from one serving process to another.
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type[LookalikeError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class DumpError(LookalikeError):
    """The dump itself cannot be read (missing root, unreadable directory)."""


class ImageRejected(LookalikeError):
    """An image was refused by the safe decoder.

    ``reason`` is a short stable code (``empty``, ``not_an_image``, ``unsupported_format``,
    ``too_large``, ``decompression_bomb``, ``too_many_frames``, ``truncated``, ``corrupt``,
    ``unreadable`` for a path that cannot be read) used for skip counts and the HTTP error code.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelNotFoundError(LookalikeError):
    """An encoder's weights could not be found locally or on the hub."""


class UnknownEncoderError(LookalikeError):
    """An encoder or profile name that is not in the registry."""


class CatalogError(LookalikeError):
    """The catalog on disk is missing, corrupt or of an unknown format."""


class EncoderMismatchError(CatalogError):
    """A catalog was opened with other encoders than it was built with."""


class DiskFullError(CatalogError):
    """A write ran out of space; the previous catalog state is intact."""


class MergeError(CatalogError):
    """Partial catalogs that cannot be merged: other encoders, not catalogs, or the same id
    with different content in two of them."""
