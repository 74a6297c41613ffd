"""Domain errors of the recommender. Only the service and the CLI turn them into HTTP / exit codes."""

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
