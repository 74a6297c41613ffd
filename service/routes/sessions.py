"""Sessions: create, describe, mute a term, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from service.routes.deps import EngineDep, error_docs, for_session
from service.schemas import MuteIn, SessionCreate, SessionCreated, SessionOut

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

SessionPath = Annotated[str, Path(min_length=1, max_length=128)]
_NOT_FOUND = error_docs((404, "unknown or expired session"))
_BAD_JSON = (400, "malformed JSON body")


@router.post("", status_code=201, responses=error_docs(_BAD_JSON))
def create_session(engine: EngineDep, body: SessionCreate | None = None) -> SessionCreated:
    """Start a session; its id carries at least 128 bits of randomness."""
    return SessionCreated(session_id=engine.create_session(body.user_id if body else None))


@router.get("/{session_id}", responses=_NOT_FOUND)
async def session_info(engine: EngineDep, session_id: SessionPath) -> SessionOut:
    """What the session has been served and the terms steering it."""
    return SessionOut.of(await for_session(engine, session_id, "session_info", session_id))


@router.post(
    "/{session_id}/mute",
    status_code=204,
    responses=error_docs(_BAD_JSON, (404, "unknown or expired session")),
)
async def mute(engine: EngineDep, session_id: SessionPath, body: MuteIn) -> Response:
    """ "Less of this": the term stops pulling the session's feed."""
    await for_session(engine, session_id, "mute", session_id, body.term)
    return Response(status_code=204)


@router.delete("/{session_id}", status_code=204, responses=_NOT_FOUND)
async def delete_session(engine: EngineDep, session_id: SessionPath) -> Response:
    """Forget the session (its acknowledged feedback stays in the catalog)."""
    await for_session(engine, session_id, "delete_session", session_id)
    return Response(status_code=204)
