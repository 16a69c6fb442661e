"""What every HTTP service mounts: the body-size guard, the error handlers, /health, /ready,
/metrics and tracing."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import install_error_handlers
from shared.logs import log_context
from shared.metrics import HttpMetrics, HttpMetricsMiddleware, Refresher, metrics_router
from shared.settings import CommonSettings
from shared.telemetry import ServerRequestHook, configure_tracing, instrument_app

logger = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[object]]


class MaxBodySizeMiddleware:
    """Refuse request bodies over ``max_bytes`` before the application buffers them.

    A declared ``Content-Length`` is refused up front; a chunked body is counted as it arrives
    and refused when it crosses the limit. The answer is a 422 naming ``body``, like any other
    invalid payload.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> HTTPException:
        return HTTPException(
            status_code=422,
            detail=[
                {
                    "loc": ["body"],
                    "msg": f"Request body is larger than {self.max_bytes} bytes",
                    "type": "body_too_large",
                }
            ],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = self._error()
            response = JSONResponse({"detail": error.detail}, status_code=error.status_code)
            await response(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the endpoint's body read, so the app's handler renders it.
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)


# Set once by the proxies in front (nginx: X-Forwarded-For and -Proto; the gateway: the
# X-Forwarded-* it sends, the request id and the trace context): not the caller's own fields.
PROXY_SET_HEADERS = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"traceparent",
        b"tracestate",
    }
)


class HeaderLimitsMiddleware:
    """Refuse a request with more than ``max_fields`` header fields, or a header section over
    ``max_bytes`` (names, values, ": " and CRLF), with a 431 before the application reads them.

    The server bounds what it buffers of an unfinished header section (uvicorn's h11 parser,
    ``--h11-max-incomplete-event-size``) but takes a complete one of any size arriving at once;
    nor does it count fields. The first field of each name the proxies in front set is not
    counted, so a request that passes the first hop passes the next.
    """

    def __init__(self, app: ASGIApp, max_fields: int, max_bytes: int) -> None:
        self.app = app
        self.max_fields = max_fields
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            fields = size = 0
            proxied: set[bytes] = set()
            for key, value in scope["headers"]:
                if key in PROXY_SET_HEADERS and key not in proxied:
                    proxied.add(key)
                    continue
                fields += 1
                size += len(key) + len(value) + 4
            if fields > self.max_fields or size > self.max_bytes:
                logger.warning(
                    "request refused: header section too large",
                    extra={"header_fields": fields, "header_bytes": size},
                )
                detail = (
                    f"More than {self.max_fields} request header fields"
                    if fields > self.max_fields
                    else f"Request header section larger than {self.max_bytes} bytes"
                )
                response = JSONResponse(
                    {"detail": detail}, status_code=431, headers={"connection": "close"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestIdLogMiddleware:
    """Every line logged while a request is served carries its X-Request-ID, so one request can
    be followed across services' logs.

    Inside the platform a service keeps the id its caller (the gateway) sent. With ``assign``
    (the gateway, the edge), every request gets a new id before anything else sees it, whatever
    the caller sent: its own log lines, the upstream and the caller then all name the gateway's
    id; a caller's own X-Request-ID, when it is a sane token, is logged as ``client_request_id``.
    """

    def __init__(self, app: ASGIApp, *, assign: bool = False) -> None:
        self.app = app
        self.assign = assign

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        given = next((value for key, value in headers if key == b"x-request-id"), None)
        sane = given if given is not None and REQUEST_ID.fullmatch(given) else None
        fields: dict[str, str] = {}
        if self.assign:
            request_id = uuid.uuid4().hex.encode()
            kept = [(key, value) for key, value in headers if key != b"x-request-id"]
            # In place: outer middleware reads what inner layers note in this same scope.
            scope["headers"] = [*kept, (b"x-request-id", request_id)]
            fields["request_id"] = request_id.decode("ascii")
            if sane is not None:
                fields["client_request_id"] = sane.decode("ascii")
        elif sane is not None:
            fields["request_id"] = sane.decode("ascii")
        if not fields:
            await self.app(scope, receive, send)
            return
        with log_context(**fields):
            await self.app(scope, receive, send)


def health_router(
    checks: Callable[[], Mapping[str, ReadinessCheck]] | None, timeout: float
) -> APIRouter:
    """``/health``: the process answers. ``/ready``: every dependency answers within ``timeout``
    (not served when ``checks`` is None).

    ``checks`` is called per request, so it can read what the lifespan put on ``app.state``.
    """
    router = APIRouter(tags=["health"])

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    if checks is None:
        return router

    @router.get("/ready", responses={503: {"description": "A dependency is unreachable"}})
    async def ready() -> JSONResponse:
        named = checks()
        results = await asyncio.gather(
            *(_probe(name, check, timeout) for name, check in named.items())
        )
        status = dict(zip(named, results, strict=True))
        ok = all(value == "ok" for value in status.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": status},
            status_code=200 if ok else 503,
        )

    return router


async def _probe(name: str, check: ReadinessCheck, limit: float) -> str:
    try:
        async with asyncio.timeout(limit):
            await check()
    except Exception as exc:  # a readiness probe reports every failure, whatever it is
        logger.warning("readiness check failed", extra={"check": name, "error": repr(exc)})
        return "unreachable"
    return "ok"


def install_common(
    app: FastAPI,
    *,
    settings: CommonSettings,
    registry: CollectorRegistry,
    refreshers: Sequence[Refresher] = (),
    max_body_bytes: int | Literal["settings"] | None = "settings",
    assign_request_ids: bool = False,
    server_request_hook: ServerRequestHook | None = None,
    serve_metrics: bool = True,
) -> None:
    """Error handlers, the body-size guard (off with ``max_body_bytes=None``), the header
    limits (431), RED metrics on
    /metrics, the request id in the logs (given one when it has none, with
    ``assign_request_ids``), and tracing."""
    install_error_handlers(app)
    limit = settings.max_request_body_bytes if max_body_bytes == "settings" else max_body_bytes
    if limit is not None:
        app.add_middleware(MaxBodySizeMiddleware, max_bytes=limit)
    app.add_middleware(RequestIdLogMiddleware, assign=assign_request_ids)
    app.add_middleware(
        HeaderLimitsMiddleware,
        max_fields=settings.max_request_header_fields,
        max_bytes=settings.max_request_header_bytes,
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))
    instrument_app(
        app, configure_tracing(settings.service_name), server_request_hook=server_request_hook
    )
    if serve_metrics:
        app.include_router(metrics_router(registry, refreshers))
