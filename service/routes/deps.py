"""Dependencies shared by the routes, as ``Annotated`` aliases: the engine, settings, fetcher."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from recommender.api import FeedbackEvent, FeedbackResult
from recommender.engine import Engine
from service.errors import ApiError
from service.netguard import SafeFetcher
from service.schemas import ErrorBody
from service.settings import Settings


async def get_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ApiError(503, "not_ready", "the catalog is not loaded yet")
    return engine


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_fetcher(request: Request) -> SafeFetcher | None:
    fetcher: SafeFetcher | None = getattr(request.app.state, "fetcher", None)
    return fetcher


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
FetcherDep = Annotated[SafeFetcher | None, Depends(get_fetcher)]


def check_limit(limit: int | None, maximum: int) -> int | None:
    """A page size asked for by a client, refused above the configured maximum."""
    if limit is not None and limit > maximum:
        raise ApiError(422, "invalid_request", f"limit must be at most {maximum}")
    return limit


def error_docs(*answers: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error answers: (status, when) pairs, all with the error body."""
    return {status: {"model": ErrorBody, "description": when} for status, when in answers}


T = TypeVar("T")


async def for_session(engine: Engine, session_id: str, method: str, *args: Any) -> Any:
    """Run the engine's ``method(*args)`` for one session where it costs least.

    For a session this process holds, over FAISS indexes, right here on the event loop's
    thread: the call is short CPU work that holds the GIL, so a worker thread could not run it
    alongside anything else, and the GIL hand-offs between the loop and pool threads cost a
    quarter more CPU per feed page (benchmarks/service.py). For a session another worker holds,
    awaited here while that worker runs it (no thread waits on it); over Milvus, whose searches
    wait on a socket, in the thread pool.
    """
    if (owners := engine.elsewhere(session_id)) is not None:
        return await owners.forward(session_id, method, *args)
    func = getattr(engine, method)
    if engine.searches_in_process:
        return func(*args)
    return await run_in_threadpool(func, *args)


async def feedback_here(
    engine: Engine, session_id: str, events: Sequence[FeedbackEvent]
) -> FeedbackResult:
    """``engine.feedback`` for a session this process holds, each half where it costs least.

    The commit waits on the disk, in a thread; the steering is CPU work and runs on the event
    loop's thread, like a page: in a second thread it contended with the loop's for the GIL,
    which cost a feed and its feedback together ~30 % more CPU (benchmarks/RESULTS.md). Over
    Milvus, whose searches wait on a socket, all of it in a thread.
    """
    if not engine.searches_in_process:
        return await run_in_threadpool(engine.feedback, session_id, events)
    stored = await run_in_threadpool(engine.store_feedback, session_id, events)
    return engine.steer_with(stored)


async def read_body(request: Request) -> bytes:
    """The request body, not kept on ``request`` (``request.body()`` keeps it for the whole
    request: up to the upload limit per request waiting for an image slot)."""
    return b"".join([chunk async for chunk in request.stream()])


async def in_image_slot(request: Request, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking ``func`` in a worker thread, at most ``image_workers`` at once.

    For work that decodes client images: a burst of large uploads then queues instead of
    holding many decoded canvases in memory together.
    """
    limiter: anyio.CapacityLimiter = request.app.state.image_slots
    return await anyio.to_thread.run_sync(partial(func, *args, **kwargs), limiter=limiter)
