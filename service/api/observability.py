"""Prometheus metrics: request counts/latency from a middleware, and job counts, job durations and
queue depth read from the job store and the broker at scrape time (so every API replica reports
the same truth, whichever worker ran the job)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.db import session_scope
from service.core.queue import queue_depth
from service.core.settings import Settings
from service.core.tables import Job

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


class JobCollector:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):
        url = self.settings.resolved_database_url
        by_status = GaugeMetricFamily("modelshrink_jobs", "Jobs in the job store by status", labels=["status"])
        with session_scope(url) as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            finished = session.execute(select(Job.started_at, Job.finished_at).where(Job.status == "succeeded", Job.started_at.is_not(None))).all()
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status

        durations = [(f - s).total_seconds() for s, f in finished if f is not None]
        buckets = [(str(b), sum(1 for d in durations if d <= b)) for b in DURATION_BUCKETS] + [("+Inf", len(durations))]
        hist = HistogramMetricFamily("modelshrink_job_duration_seconds", "Run time of succeeded jobs")
        hist.add_metric([], buckets, sum_value=sum(durations))
        yield hist

        depth = GaugeMetricFamily("modelshrink_queue_depth", "Jobs waiting in the broker queue")
        try:
            depth.add_metric([], queue_depth(self.settings))
        except Exception:  # noqa: BLE001 - a metrics scrape must answer even when the broker is down: NaN says unknown
            depth.add_metric([], float("nan"))
        yield depth


def build_registry(settings: Settings) -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    requests = Counter("modelshrink_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("modelshrink_http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry)
    registry.register(JobCollector(settings))
    return registry, requests, latency


class MetricsMiddleware:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware costs a task group per request and
    buffers streaming responses such as the SSE endpoint)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The route template (/v1/jobs/{job_id}), not the path, keeps label cardinality bounded.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status[0])).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
