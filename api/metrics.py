"""Prometheus metrics: request count and latency, and jobs by status (read at scrape time).
The operator token scrapes everything; a tenant's API key only its own jobs by status."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import session_scope
from service.orm import Job
from service.settings import Settings
from service.states import STATUSES

log = logging.getLogger(__name__)


class JobsByStatus:
    """`slimline_jobs{status}`: every tenant's jobs, or only `tenant_id`'s."""

    def __init__(self, settings: Settings, tenant_id: str | None = None) -> None:
        self.settings = settings
        self.tenant_id = tenant_id

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("slimline_jobs", "Jobs by status", labels=["status"])
        counts = dict.fromkeys(STATUSES, 0)
        query = select(Job.status, func.count()).group_by(Job.status)
        if self.tenant_id is not None:
            query = query.where(Job.tenant_id == self.tenant_id)
        try:
            with session_scope(self.settings) as session:
                counts |= dict(session.execute(query).all())
        except Exception:  # a scrape must not fail because the DB is down
            log.warning("could not count jobs for /metrics", exc_info=True)
        for status, count in counts.items():
            gauge.add_metric([status], count)
        yield gauge


class Metrics:
    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("slimline_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("slimline_http_request_duration_seconds",
                                 "HTTP request latency", ["method", "route"],
                                 registry=self.registry)
        self.registry.register(JobsByStatus(settings))


def tenant_registry(settings: Settings, tenant_id: str) -> CollectorRegistry:
    """What a tenant's API key may scrape: its own jobs by status, nothing else."""
    registry = CollectorRegistry()
    registry.register(JobsByStatus(settings, tenant_id))
    return registry


class MetricsMiddleware:
    """Counts requests and observes their latency (until the response starts, so a long
    streamed body does not count) by route template. Pure ASGI: the status is read from the
    response's start message; shed or unrouted requests are "unmatched"."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, elapsed = 500, None  # an exception before the response started is a 500

        async def send_status(message: Message) -> None:
            nonlocal status, elapsed
            if message["type"] == "http.response.start":
                status, elapsed = message["status"], time.perf_counter() - started
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(
                elapsed if elapsed is not None else time.perf_counter() - started)
