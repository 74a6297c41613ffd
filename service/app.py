"""The FastAPI application: ``create_app(settings, engine=None)`` builds everything once.

Middlewares, outermost first: metrics and access log, HEAD answered as GET, CORS (only when
origins are configured), per-client rate limit, request-body limit. The engine is opened in the
``lifespan`` (unless one is given, which the caller then owns). Blocking engine calls run in
the thread pool, except the short ones for a session this process holds (feed, session info,
mute, delete, and feedback's steering once its commit is done): those run on the event loop's
thread (``routes.deps.for_session``, ``routes.deps.feedback_here``). Those same calls for a
session another worker process holds are awaited on the loop while that worker runs them
(``service/workers.py``).
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    contextmanager,
    nullcontext,
)
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import anyio.to_thread
import orjson
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from recommender.engine import Engine, EngineConfig, one_blas_thread
from recommender.generate import make_generator
from recommender.sessions import SessionConfig, SessionOwners
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import (
    BodyLimitMiddleware,
    HeadAsGetMiddleware,
    MetricsMiddleware,
    RateLimitMiddleware,
    TokenBuckets,
)
from service.netguard import FetchLimits, SafeFetcher
from service.routes import ROUTERS
from service.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
UPLOAD_PATHS = frozenset({"/v1/search", "/knn-service", "/v1/score"})
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
HEAD_PATHS = PROBE_PATHS | {"/", "/docs", "/openapi.json", "/indices-list"}
ENCODER_LOAD_WAIT_S = 120.0  # the longest a shutdown waits for the encoders' load to end
IMAGE_COST = 0.2  # one feed page shows ~20 images: fetching them should not cost 20 requests


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extra fields."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
        "message",
        "asctime",
        "taskName",
    }

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(*, json_lines: bool, access_log: bool = True) -> None:
    """Serve-time logging: the service's own INFO lines (and its access log, unless turned
    off) on, JSON lines if asked."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING)
    if json_lines:
        for handler in root.handlers:
            handler.setFormatter(JsonLogFormatter())
    if logging.getLogger("service").getEffectiveLevel() > logging.INFO:
        logging.getLogger("service").setLevel(logging.INFO)
    if not access_log:
        logging.getLogger("service.access").setLevel(logging.WARNING)


def open_engine(settings: Settings, owners: SessionOwners | None = None) -> Engine:
    """Open the catalog at ``settings.catalog`` with the encoders its manifest records, and
    the generator the settings ask for (``owners``: this is one of several serving
    processes, see ``service/workers.py``)."""
    diffusers_config = None
    if settings.generator == "diffusers":
        from recommender.generate_diffusers import DiffusersConfig

        diffusers_config = DiffusersConfig(**settings.diffusers_options())  # type: ignore[arg-type]
    generator = make_generator(
        settings.generator, settings.generation_config(), diffusers_config=diffusers_config
    )
    defaults = EngineConfig()
    config = replace(
        defaults,
        sessions=SessionConfig(ttl_s=settings.session_ttl_s, max_sessions=settings.max_sessions),
        max_page=settings.max_page,
        upload_limits=replace(defaults.upload_limits, max_bytes=settings.max_upload_bytes),
    )
    return Engine.from_catalog(
        settings.catalog,
        device=settings.device,
        dtype=settings.dtype,
        config=config,
        generator=generator,
        store=settings.store_config(),
        policy=settings.index_policy(),
        owners=owners,
    )


def serve_engine(
    settings: Settings,
    engine: Engine,
    sock: socket.socket | None = None,
    around: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
) -> None:
    """Serve the API over ``engine`` until told to stop, on ``settings.host``/``port`` or on
    ``sock`` (a worker process's listening socket, see ``service/workers.py``); ``around``
    is entered on the serving event loop at start-up and left at shutdown."""
    import uvicorn

    config = uvicorn.Config(
        create_app(settings, engine, around=around),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # ours has no client address and no query string
        proxy_headers=False,  # X-Forwarded-For is read by the app when trusted
        server_header=False,
    )
    with _sigterm_unwinds():
        uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Make the SIGTERM that uvicorn raises again after its graceful shutdown exit this
    process as SystemExit(0), so that the caller's ``finally`` closes the engine (the
    generator writes the FAISS snapshots it owes, SQLite folds its WAL back) and a worker
    process exits through multiprocessing's clean-up. Under SIGTERM's default action the
    process would end inside uvicorn, skipping both. A second SIGTERM meanwhile kills."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (uvicorn installs none either)
        return

    def unwind(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is unwind:  # (None: not set from Python)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _version() -> str:
    try:
        return version("lookalike")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    around: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
) -> FastAPI:
    """The lookalike HTTP API over ``engine``, or over an engine opened from ``settings``;
    ``around`` is entered on the serving event loop at start-up (a worker's peers, see
    ``service/workers.py``) and left at shutdown."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        one_blas_thread()
        async with around() if around is not None else nullcontext():
            current = (
                engine if engine is not None else await run_in_threadpool(open_engine, settings)
            )
            app.state.engine = current
            app.state.image_slots = anyio.CapacityLimiter(settings.image_workers)
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
            metrics.bind_engine(current.stats)
            if current.generator is not None:
                current.generator.start(current)  # loads its models in the background
            # Encoders load in the background: /healthz answers at once, /readyz once loaded.
            loader = threading.Thread(target=_load_encoders, args=(app, current), daemon=True)
            loader.start()
            log.info("serving catalog %s (%s)", settings.catalog, ", ".join(current.spaces))
            try:
                yield
            finally:
                # A stop during the load waits for it: a process that exits while torch builds
                # a model in another thread aborts ("terminate called", status 134).
                await run_in_threadpool(loader.join, ENCODER_LOAD_WAIT_S)
                metrics.bind_engine(None)
                app.state.engine = None
                if owned:
                    await run_in_threadpool(current.close)

    app = FastAPI(
        title="lookalike",
        version=_version(),
        summary="Drop an image, scroll endlessly; how long you look steers what comes next.",
        lifespan=lifespan,
        docs_url=None,  # _add_api_docs
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    app.state.load_error = None
    app.state.fetcher = (
        SafeFetcher(
            FetchLimits(
                max_bytes=settings.max_upload_bytes,
                timeout_s=settings.image_url_timeout_s,
                max_redirects=settings.image_url_max_redirects,
            )
        )
        if settings.image_url_fetch
        else None
    )
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    _add_api_docs(app)
    _add_web_page(app)

    # add_middleware wraps what is there: the last one added is the outermost.
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=lambda path: (
            settings.max_upload_bytes if path in UPLOAD_PATHS else settings.max_json_bytes
        ),
        metrics=metrics,
    )
    if settings.rate_limit_per_s > 0:
        app.add_middleware(
            RateLimitMiddleware,
            buckets=TokenBuckets(
                settings.rate_limit_per_s, settings.rate_limit_burst, settings.rate_limit_clients
            ),
            trust_forwarded_for=settings.trust_forwarded_for,
            exempt=PROBE_PATHS,
            cost_for=lambda path: IMAGE_COST if path.startswith("/v1/images/") else 1.0,
            metrics=metrics,
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type"],
            max_age=600,
        )
    app.add_middleware(HeadAsGetMiddleware, safe=_head_safe)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _head_safe(path: str) -> bool:
    """GETs that change nothing, which HEAD may run (not /v1/feed: it serves a page)."""
    return path in HEAD_PATHS or path.startswith(("/v1/images/", "/static/"))


def _load_encoders(app: FastAPI, engine: Engine) -> None:
    try:
        engine.load()
    except Exception as exc:  # noqa: BLE001 - reported by /readyz, the process keeps serving
        log.exception("loading the encoders failed")
        app.state.load_error = f"{type(exc).__name__}: {exc}"
    # What start-up built (catalog, models, modules) lives as long as the process: keep it out
    # of the cycle collector's full collections, which otherwise scan it all and stall every
    # request meanwhile (at 1M items ~80 ms a collection, 26 ms with this).
    gc.freeze()


def _add_api_docs(app: FastAPI) -> None:
    """``/docs``: static/api-docs.js loads Swagger UI from a CDN, or shows a plain reference
    from ``/openapi.json`` where the CDN is out of reach."""
    page = (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{app.title} - API</title>\n</head>\n<body>\n"
        '<div id="swagger-ui"></div>\n<script src="static/api-docs.js"></script>\n'
        "</body>\n</html>\n"
    )

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return HTMLResponse(page)


def _add_web_page(app: FastAPI) -> None:
    """Serve the static web page at ``/`` when the package ships one."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        return

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(index)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
