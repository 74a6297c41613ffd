"""Dwell feedback: stored durably, idempotent by event id, steering the session at once."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from service.routes.deps import EngineDep, error_docs, feedback_here
from service.schemas import FeedbackIn, FeedbackOut

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["feedback"])


@router.post(
    "/feedback",
    status_code=202,
    # 400: FastAPI answers a body that is not JSON before the route runs (found by fuzzing).
    responses=error_docs(
        (400, "malformed JSON body"), (404, "unknown or expired session"), (422, "invalid events")
    ),
)
async def feedback(engine: EngineDep, body: FeedbackIn) -> FeedbackOut:
    """Record dwell events; answered only once they are committed to the catalog."""
    events = [e.to_event() for e in body.events]
    if (owners := engine.elsewhere(body.session_id)) is not None:
        result = await owners.forward(body.session_id, "feedback", body.session_id, events)
    else:
        result = await feedback_here(engine, body.session_id, events)
    # Counts only: dwell values never reach the logs.
    log.info("feedback: %d accepted, %d duplicates", result.accepted, result.duplicates)
    return FeedbackOut.of(result)
