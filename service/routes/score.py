"""Text-image alignment scores (100 x CLIP cosine) of one pair or a batch; needs CLIP."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from recommender.alignment import ScorePair, score_pairs
from recommender.engine import Engine
from service.errors import ApiError
from service.routes.deps import EngineDep, error_docs, in_image_slot
from service.schemas import ScoreIn, ScoreOut

router = APIRouter(prefix="/v1", tags=["alignment"])


def _score(engine: Engine, pairs: list[ScorePair]) -> ScoreOut:
    return ScoreOut.of(score_pairs(engine, pairs).tolist())


@router.post(
    "/score",
    responses=error_docs(
        (400, "an empty image"),
        (404, "unknown image id"),
        (413, "body or image too large"),
        (415, "not an image or a refused format"),
        (422, "invalid fields or image, or the catalog has no CLIP (`clip` space)"),
    ),
)
async def score(request: Request, engine: EngineDep, body: ScoreIn) -> ScoreOut:
    """How well each image matches its text: 100 x the CLIP cosine (CLIP's logit scale).

    One pair (``text`` with ``image_id`` or ``image_b64``) or ``pairs`` (up to 64). Indexed
    images use their stored CLIP embedding. A catalog without a ``clip`` space (the offline
    profile) answers 422 ``unsupported_query`` saying how to add one.
    """
    try:
        pairs = await run_in_threadpool(body.to_pairs)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    uploads = any(pair.image is not None for pair in pairs)
    run = partial(in_image_slot, request) if uploads else run_in_threadpool
    result: ScoreOut = await run(_score, engine, pairs)
    return result
