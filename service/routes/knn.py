"""clip-retrieval compatible endpoints: what its ``ClipClient`` and front end call.

Indices are the catalog's embedding spaces. ``ClipClient`` posts JSON without a Content-Type,
so the body is read as JSON whatever the header says (as clip-retrieval's own back end does).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from recommender.api import ImageQuery, TextQuery
from recommender.engine import Engine
from service.errors import ApiError
from service.netguard import SafeFetcher
from service.routes.deps import (
    EngineDep,
    FetcherDep,
    SettingsDep,
    error_docs,
    in_image_slot,
    read_body,
)
from service.schemas import KnnIn, KnnResult, decode_b64
from service.settings import Settings

router = APIRouter(tags=["clip-retrieval"])


@router.get("/indices-list")
def indices_list(engine: EngineDep) -> list[str]:
    """The index names ``/knn-service`` accepts as ``indice_name``, the primary space first."""
    return sorted(engine.spaces, key=lambda space: space != engine.primary_space)


def _parse(raw: bytes) -> KnnIn:
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    try:
        return KnnIn.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False)) from None


def _knn(
    body: KnnIn, engine: Engine, settings: Settings, fetcher: SafeFetcher | None, base_url: str
) -> list[KnnResult]:
    query: Any
    if body.text is not None:
        query = TextQuery(body.text)
    elif body.image is not None:
        try:
            query = ImageQuery(decode_b64(body.image, "image"))
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None
    elif body.image_url is not None:
        if fetcher is None:
            raise ApiError(
                403, "image_url_disabled", "fetching image_url is off on this server; send image"
            )
        query = ImageQuery(fetcher.fetch(body.image_url))
    else:
        query = np.asarray(body.embedding_input, dtype=np.float64)  # checked in float64
    k = min(body.num_images, settings.max_knn_results)
    hits = engine.knn(query, space=body.indice_name, k=k)
    return [KnnResult.of(hit, base_url) for hit in hits]


@router.post(
    "/knn-service",
    responses=error_docs(
        (400, "malformed JSON"),
        (403, "image_url fetching is off, or the URL is not public"),
        (404, "unknown indice_name"),
        (413, "body or image too large"),
        (415, "not an image or a refused format"),
        (422, "invalid fields, wrong embedding size, unreachable image_url"),
    ),
)
async def knn_service(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    fetcher: FetcherDep,
) -> list[KnnResult]:
    """Nearest images to a text, a base64 image, an image URL or an embedding.

    Answers ``[{"id", "similarity", "url", "caption"}]``, best first.
    """
    body = await run_in_threadpool(_parse, await read_body(request))
    if body.indice_name is not None and body.indice_name not in engine.spaces:
        have = ", ".join(engine.spaces)
        raise ApiError(404, "unknown_index", f"no index {body.indice_name!r}; have {have}")
    images = body.image is not None or body.image_url is not None
    run = partial(in_image_slot, request) if images else run_in_threadpool
    return await run(_knn, body, engine, settings, fetcher, str(request.base_url))
