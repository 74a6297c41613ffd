"""Search (an uploaded image, an indexed image, or text) and the endless feed that follows it."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from recommender.api import ImageQuery
from recommender.api import Query as EngineQuery
from service.errors import ApiError
from service.routes.deps import (
    EngineDep,
    SettingsDep,
    check_limit,
    error_docs,
    for_session,
    in_image_slot,
    read_body,
)
from service.schemas import FeedOut, SearchIn, SearchOptions, SearchOut

router = APIRouter(prefix="/v1", tags=["search"])

_UPLOAD_TYPES = ("image/", "application/octet-stream")
_FORM_FIELDS = frozenset({"file", "session_id", "filters", "limit"})


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined (OpenAPI resolves refs elsewhere)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_SEARCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(SearchIn.model_json_schema())},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "session_id": {"type": "string"},
                        "filters": {"type": "string", "description": "FiltersIn as JSON"},
                        "limit": {"type": "integer"},
                    },
                }
            },
        },
    }
}
_ERRORS = error_docs(
    (400, "empty upload or malformed body"),
    (404, "unknown session or image id"),
    (413, "body or image too large, decompression or frame bomb"),
    (415, "not an image, a refused format, or a wrong Content-Type"),
    (422, "invalid fields, truncated or corrupt image"),
)


def _validated(model: type[SearchOptions], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_input=False)) from None


def _json_search(raw: bytes) -> tuple[EngineQuery, SearchOptions]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    body: SearchIn = _validated(SearchIn, data)
    del data  # the parsed base64 text, as big as the upload
    try:
        query = body.query()
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    # The options without the query: the base64 text is not held while the search runs.
    options = SearchOptions.model_construct(
        **{name: getattr(body, name) for name in SearchOptions.model_fields}
    )
    return query, options


async def _form_search(request: Request) -> tuple[EngineQuery, SearchOptions]:
    try:
        form = await request.form(max_files=1, max_fields=len(_FORM_FIELDS))
    except HTTPException as exc:
        raise ApiError(400, "bad_multipart", str(exc.detail)) from None
    try:
        unknown = set(form.keys()) - _FORM_FIELDS
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown form fields: {sorted(unknown)}")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "the multipart body needs a `file` part")
        declared = (upload.content_type or "").lower()
        if declared and not declared.startswith(_UPLOAD_TYPES):
            raise ApiError(415, "unsupported_media_type", f"an upload of type {declared}")
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "file"}
        if isinstance(fields.get("filters"), str):
            try:
                fields["filters"] = orjson.loads(fields["filters"])
            except orjson.JSONDecodeError:
                raise ApiError(422, "invalid_request", "filters is not valid JSON") from None
        options: SearchOptions = _validated(SearchOptions, fields)
        data = await upload.read()
    finally:
        await form.close()
    return ImageQuery(data), options


@router.post("/search", openapi_extra=_SEARCH_BODY, responses=_ERRORS)
async def search(request: Request, engine: EngineDep, settings: SettingsDep) -> SearchOut:
    """Start (or restart) a scroll from an image upload, an image id or a text.

    JSON ``{"image_b64" | "image_id" | "text", "session_id"?, "filters"?, "limit"?}`` or
    multipart with a ``file`` part. Without ``session_id`` a new session is created.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        query, options = await _form_search(request)
    elif content_type == "application/json" or content_type.endswith("+json"):
        query, options = await run_in_threadpool(_json_search, await read_body(request))
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send application/json or multipart/form-data, not " + (content_type or "no type"),
        )
    check_limit(options.limit, settings.max_page)
    run = partial(in_image_slot, request) if isinstance(query, ImageQuery) else run_in_threadpool
    page = await run(
        engine.search,
        query,
        session_id=options.session_id,
        filters=options.filters.to_filters() if options.filters else None,
        limit=options.limit,
    )
    return SearchOut.of(page)


@router.get("/feed", responses=_ERRORS)
async def feed(
    engine: EngineDep,
    settings: SettingsDep,
    session_id: Annotated[str, Query(min_length=1, max_length=128)],
    limit: Annotated[int | None, Query(ge=1)] = None,
) -> FeedOut:
    """The session's next page; never repeats an item it was served."""
    limit = check_limit(limit, settings.max_page)
    return FeedOut.of(await for_session(engine, session_id, "feed", session_id, limit))
