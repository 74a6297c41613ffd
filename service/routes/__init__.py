"""The API's routers, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from service.routes import feedback, images, knn, ops, score, search, sessions, taste

ROUTERS: tuple[APIRouter, ...] = (
    sessions.router,
    search.router,
    feedback.router,
    images.router,
    knn.router,
    ops.router,
    score.router,
    taste.router,
)
