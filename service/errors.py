"""The one place where errors become HTTP: every error body is ``{"error": {"code", "message"}}``.

Domain errors (``LookalikeError`` and its subclasses) map to 4xx statuses by type; image
rejections map by their ``reason``. Anything else reaching the edge is a bug: it is logged with
its traceback and answered 500 ``internal`` in the same JSON shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from indexer.errors import (
    CatalogError,
    DiskFullError,
    ImageRejected,
    LookalikeError,
    ModelNotFoundError,
)
from recommender.errors import (
    SessionOwnerUnavailableError,
    UnknownItemError,
    UnknownSessionError,
    UnsupportedQueryError,
)

log = logging.getLogger(__name__)

# ImageRejected.reason -> HTTP status. Reasons not listed here are 422.
IMAGE_REJECTION_STATUS: Final[Mapping[str, int]] = {
    "empty": 400,
    "not_an_image": 415,
    "unsupported_format": 415,
    "too_large": 413,
    "decompression_bomb": 413,
    "too_many_frames": 413,
    "truncated": 422,
    "corrupt": 422,
}

_MAX_MESSAGE = 500
BODY_REFUSED = "body_refused"  # request.state flag: the body limit answers this request


class ApiError(Exception):
    """An error the service itself raises at the edge (bad request shape, not ready, ...)."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class UrlFetchError(Exception):
    """Fetching a client-given image URL was refused or failed; ``reason`` is a stable code.

    Reasons: ``bad_url``, ``forbidden_address``, ``too_large``, ``too_many_redirects``,
    ``timeout``, ``unreachable``, ``http_error``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_FETCH_STATUS: Final[Mapping[str, int]] = {
    "bad_url": 400,
    "forbidden_address": 403,
    "too_large": 413,
}


def error_body(code: str, message: str) -> bytes:
    """The JSON error body, as bytes (also used by the ASGI middlewares)."""
    return orjson.dumps({"error": {"code": code, "message": message[:_MAX_MESSAGE]}})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        error_body(code, message),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def status_for(exc: LookalikeError) -> tuple[int, str]:
    """HTTP status and error code for a domain error."""
    if isinstance(exc, ImageRejected):
        return IMAGE_REJECTION_STATUS.get(exc.reason, 422), exc.reason
    if isinstance(exc, UnknownSessionError):
        return 404, "unknown_session"
    if isinstance(exc, UnknownItemError):
        return 404, "unknown_image"
    if isinstance(exc, UnsupportedQueryError):
        return 422, "unsupported_query"
    if isinstance(exc, DiskFullError):
        return 507, "disk_full"
    if isinstance(exc, SessionOwnerUnavailableError):
        return 503, "worker_unavailable"
    if isinstance(exc, CatalogError | ModelNotFoundError):
        return 503, "catalog_unavailable"
    return 400, "bad_request"


def count_error(request: Request, code: str) -> None:
    """Count an error answer by code in the app's metrics (when it has them), unless the body
    limit answers the request instead (it counts its own 413 or 408)."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and not getattr(request.state, BODY_REFUSED, False):
        metrics.count_error(code)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        # pydantic prefixes what a validator raised with "Value error, ": not for people
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Register the translations above on ``app``."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        count_error(request, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def on_domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LookalikeError)
        status, code = status_for(exc)
        if status >= 500:
            log.error("request failed: %s: %s", code, exc)
        count_error(request, code)
        return error_response(status, code, str(exc))

    async def on_fetch_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, UrlFetchError)
        code = f"image_url_{exc.reason}"
        count_error(request, code)
        return error_response(_FETCH_STATUS.get(exc.reason, 422), code, str(exc))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                # A body that is not JSON at all: 400, as the routes that parse their own say.
                count_error(request, "invalid_json")
                where = error.get("loc", ())[-1]
                message = f"the body is not valid JSON (at character {where})"
                return error_response(400, "invalid_json", message)
        count_error(request, "invalid_request")
        return error_response(422, "invalid_request", _validation_message(exc))

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # The client closed the connection before its body arrived: nobody reads this answer,
        # and it is no error of the service's (not a 500, not a traceback in the log).
        log.info("%s %s: the client left before sending its body", request.method, request.url.path)
        count_error(request, "client_disconnected")
        return error_response(499, "client_disconnected", "the client closed the connection")

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        count_error(request, code)
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    async def on_bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        count_error(request, "internal")
        return error_response(500, "internal", "internal server error")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(LookalikeError, on_domain_error)
    app.add_exception_handler(UrlFetchError, on_fetch_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)
