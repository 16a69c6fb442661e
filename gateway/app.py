"""The gateway: the platform's single entry point. Its own routes are mounted first (/health and
whether the platform is up); every other path goes through the route table
(gateway/settings.py) to an upstream service. Its metrics, docs, route table and detailed
upstream status are on the internal port (gateway/internal.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.client import HTTPResponse
from http.cookiejar import Cookie, CookieJar
from urllib.request import Request as UrllibRequest

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from gateway.edge import TraceBoundary, link_caller
from gateway.internal import create_internal_app, serving
from gateway.proxy import Proxy
from gateway.routes import RouteTable
from gateway.settings import GatewaySettings
from gateway.status import public_router as status_router
from shared.logs import configure_logging
from shared.telemetry import NO_NATIVE_TELEMETRY, configure_tracing
from shared.web import health_router, install_common

PROXIED_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class KeepNoCookies(CookieJar):
    """The upstream client's cookie jar: the client serves every caller, so an upstream's
    cookies go back to the caller in its response and are never kept, to go out with anybody
    else's request."""

    def extract_cookies(self, response: HTTPResponse, request: UrllibRequest) -> None:
        return None

    def set_cookie(self, cookie: Cookie) -> None:
        return None


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    configure_logging(settings)
    registry = CollectorRegistry()
    routes = RouteTable(settings.gateway_routes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pooled client for every upstream: no connection set up per request.
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                settings.gateway_timeout_seconds,
                connect=settings.gateway_connect_timeout_seconds,
                pool=settings.gateway_pool_timeout_seconds,
            ),
            limits=httpx.Limits(
                max_connections=settings.gateway_max_connections,
                max_keepalive_connections=settings.gateway_max_keepalive_connections,
                keepalive_expiry=settings.gateway_keepalive_expiry_seconds,
            ),
            follow_redirects=False,
            cookies=KeepNoCookies(),
        )
        # A CLIENT span for every upstream call, whose W3C context the upstream continues.
        HTTPXClientInstrumentor.instrument_client(
            client, tracer_provider=configure_tracing(settings.service_name)
        )
        app.state.settings = settings
        app.state.routes = routes
        app.state.http = client
        app.state.proxy = Proxy(client, routes, settings.gateway_max_body_bytes)
        try:
            async with serving(internal, settings):
                yield
        finally:
            await client.aclose()

    app = FastAPI(
        title="gateway",
        summary="The single entry point: routes /api/* to the platform's services.",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,
        # The public port serves the routed APIs and /health; the docs are on the internal one.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    internal = create_internal_app(app, registry, timeout=settings.readiness_timeout_seconds)
    app.state.internal_app = internal  # the internal port's app (its state is this one's)
    # The gateway's body limit answers 413 itself, so the services' 422 guard is not used here.
    install_common(
        app,
        settings=settings,
        registry=registry,
        max_body_bytes=None,
        assign_request_ids=True,
        server_request_hook=link_caller,
        serve_metrics=False,  # on the internal port
    )
    # The trust boundary goes outside every other layer, the server span's included (the
    # instrumentation wraps the stack the same way), so that the span starts a new trace for
    # callers outside it.
    instrumented = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        return TraceBoundary(instrumented(), trusted=settings.gateway_trusted_callers)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]

    app.include_router(health_router(None, timeout=settings.readiness_timeout_seconds))
    app.include_router(status_router)

    @app.api_route("/{path:path}", methods=PROXIED_METHODS, include_in_schema=False)
    async def proxy(request: Request) -> Response:
        gateway: Proxy = request.app.state.proxy
        return await gateway.handle(request)

    return app
