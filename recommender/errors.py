"""Domain errors of the recommender; only the service and the CLI map them to HTTP / exit codes."""

from __future__ import annotations

from indexer.errors import LookalikeError


class RecommenderError(LookalikeError):
    """Base class of every error the recommender raises on purpose."""


class UnknownSessionError(RecommenderError):
    """No live session has this id (never created, deleted, expired or evicted)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"unknown or expired session: {session_id!r}")
        self.session_id = session_id


class UnknownStrategyError(RecommenderError):
    """A steering strategy name that is not one of the known ones."""

    def __init__(self, name: str, valid: tuple[str, ...]) -> None:
        super().__init__(f"unknown steering strategy {name!r}; valid: {', '.join(valid)}")
        self.name = name
        self.valid = valid


class UnknownItemError(RecommenderError):
    """No item in the catalog has this id."""

    def __init__(self, image_id: str) -> None:
        super().__init__(f"unknown image id: {image_id!r}")
        self.image_id = image_id


class UnsupportedQueryError(RecommenderError):
    """The query needs something this catalog lacks (e.g. a CLIP space for an embedding)."""


class SessionOwnerUnavailableError(RecommenderError):
    """The serving process that holds a session did not answer (it stopped or restarts)."""
