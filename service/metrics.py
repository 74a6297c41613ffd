"""Prometheus metrics of one app: a registry of its own, so several apps in one process never mix.

Request metrics are labelled by route *template* (``/v1/images/{image_id}``), never by raw path,
so their number stays bounded whatever clients send. Catalog size and live sessions are read from
the engine when ``/metrics`` is scraped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

EngineStats = Callable[[], Mapping[str, int]]


# (engine stats key, metric name, help) read at scrape time.
_ENGINE_GAUGES = (
    ("items", "lookalike_catalog_items", "Items in the catalog."),
    ("live_sessions", "lookalike_live_sessions", "Sessions held in memory."),
    ("generation_queued", "lookalike_generation_queued", "Generation jobs waiting."),
)
_ENGINE_COUNTERS = (
    ("generation_completed", "lookalike_generation_jobs_completed", "Generation jobs done."),
    ("generation_failed", "lookalike_generation_jobs_failed", "Generation jobs failed."),
    ("generation_refused", "lookalike_generation_requests_refused", "Generation refused."),
    ("generated_images", "lookalike_generated_images", "Images generated and indexed."),
)


class _EngineCollector(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self) -> None:
        self.stats: EngineStats | None = None

    def collect(self) -> Iterator[Metric]:
        if self.stats is None:
            return
        try:
            stats = self.stats()
        except Exception:  # noqa: BLE001 - a scrape must never fail because of the engine
            log.exception("engine stats failed")
            return
        for key, name, doc in _ENGINE_GAUGES:
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        for key, name, doc in _ENGINE_COUNTERS:
            if key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))


class Metrics:
    """Request latency, request and error counts, and the engine's gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "lookalike_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "lookalike_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lookalike_http_errors",
            "Error answers by error code (the `error.code` of the body).",
            ["code"],
            registry=self.registry,
        )
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        ProcessCollector(registry=self.registry)

    def bind_engine(self, stats: EngineStats | None) -> None:
        """Read the catalog / session gauges from ``stats`` (None: stop reporting them)."""
        self._engine.stats = stats

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.latency.labels(method, route).observe(seconds)
        self.requests.labels(method, route, str(status)).inc()

    def count_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
