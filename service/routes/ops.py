"""Probes and metrics for operators."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.errors import ApiError
from service.routes.deps import error_docs
from service.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> Health:
    """The process is up (liveness)."""
    return Health()


@router.get("/readyz", responses=error_docs((503, "not ready")))
def readyz(request: Request) -> Readiness:
    """The catalog is loaded and the encoders are ready to take queries (readiness)."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready():
        failed = getattr(request.app.state, "load_error", None)
        message = f"loading failed: {failed}" if failed else "the catalog or encoders are loading"
        raise ApiError(503, "not_ready", message)
    return Readiness(ready=True, items=int(engine.stats().get("items", 0)))


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    """Prometheus text exposition: request latency and counts, catalog size, live sessions."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
