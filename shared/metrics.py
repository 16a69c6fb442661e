"""Prometheus exposition: each app owns a registry and serves it on /metrics.

Names are in base units with ``_total`` on counters; no label carries a tenant, a user or a
raw path, whose number grows without bound. Started as several processes (``WEB_CONCURRENCY``),
a service serves the totals of all of them (:mod:`shared.multiprocess`); each gauge says how
its processes' values combine (``multiprocess_mode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from fastapi import APIRouter, Response
from opentelemetry.instrumentation.utils import suppress_instrumentation
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.multiprocess import dead_processes, multiprocess_directory

logger = logging.getLogger(__name__)

# What shared.errors answers a client abort with (nginx's status for "client closed request"):
# nobody receives it; the access log and the request metrics record it.
CLIENT_CLOSED_REQUEST = 499

Refresher = Callable[[], Awaitable[None]]

# The *_created series double every counter and histogram for no use of ours.
disable_created_metrics()  # type: ignore[no-untyped-call]


def metrics_router(registry: CollectorRegistry, refreshers: Sequence[Refresher] = ()) -> APIRouter:
    """``/metrics``. ``refreshers`` update gauges that are read at scrape time (a database
    count); one that fails leaves its gauges as they were and the scrape still answers.

    In a multi-process start, what every process of the start wrote to its directory, summed
    (``registry`` then only checks that names are unique), without the live gauges of the
    processes that were killed."""
    router = APIRouter(tags=["metrics"])
    served = registry
    directory = multiprocess_directory()
    if directory is not None:
        served = CollectorRegistry()
        MultiProcessCollector(served, path=str(directory))  # type: ignore[no-untyped-call]

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        for refresh in refreshers:
            try:
                with suppress_instrumentation():  # a scrape's queries are not worth a trace each
                    await refresh()
            except Exception as exc:  # a scrape must answer even when a source is away
                logger.warning("metrics refresh failed", extra={"error": repr(exc)})
        if directory is None:
            return Response(generate_latest(served), media_type=CONTENT_TYPE_LATEST)
        # Reading every process's files is file I/O: off the event loop.
        return Response(
            await asyncio.to_thread(_collect_processes, directory, served),
            media_type=CONTENT_TYPE_LATEST,
        )

    return router


def _collect_processes(directory: Path, served: CollectorRegistry) -> bytes:
    forget_killed_processes(directory)
    return generate_latest(served)


def forget_killed_processes(directory: Path) -> None:
    """Mark dead the processes of ``directory`` that no longer run: one killed (SIGKILL by
    uvicorn's supervisor or the OOM killer) could not, and its live gauges (the requests it was
    serving) would stay in the totals until the next start."""
    for pid in dead_processes(directory):
        with contextlib.suppress(FileNotFoundError):  # another process's scrape got there first
            mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class HttpMetrics:
    """RED metrics of an HTTP service: rate and errors from the histogram's count by status."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP requests, by method, route template and status code.",
            ["method", "route", "status_code"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10),
            registry=registry,
        )
        self.active = Gauge(
            "http_server_active_requests",
            "HTTP requests being served now.",
            registry=registry,
            multiprocess_mode="livesum",  # the processes' sum; a stopped one counts no more
        )
        self.client_aborts = Counter(
            "http_server_client_aborts",
            "Requests whose client went away before its request body arrived whole (recorded "
            "in the duration histogram with status 499, never as a server error).",
            registry=registry,
        )


# The methods HTTP defines (RFC 9110, and PATCH): any other is one label, so a client cannot
# grow the number of series (or, in traces, of span names).
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)


class HttpMetricsMiddleware:
    """Observe every request under its route template (``/campaigns/{campaign_id}``), never
    the raw path, so the number of series stays bounded; unrouted requests share one label."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.active.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.active.dec()
            # A catch-all (the gateway's proxy) names its own bounded label in "metrics_route".
            route = scope.get("metrics_route") or getattr(scope.get("route"), "path", None)
            route = route or "unmatched"
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            if status == CLIENT_CLOSED_REQUEST:
                self.metrics.client_aborts.inc()
            self.metrics.duration.labels(method, route, str(status)).observe(
                time.perf_counter() - started
            )
