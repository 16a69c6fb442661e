"""The gateway's own endpoints. On the public port, only whether the platform is up; on the
internal port (gateway/internal.py), the route table and each upstream's readiness in detail:
upstream addresses are no business of the public."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.routes import Route, RouteTable

router = APIRouter(prefix="/api/gateway", tags=["gateway"])  # internal
public_router = APIRouter(prefix="/api/gateway", tags=["gateway"])


@router.get("/services", summary="The route table")
async def services(request: Request) -> dict[str, Any]:
    table: RouteTable = request.app.state.routes
    return {
        "services": [
            {"name": route.name, "prefix": route.prefix, "upstream": route.upstream}
            for route in table.routes
        ]
    }


@router.get(
    "/status",
    summary="Each upstream's /ready, probed at once",
    responses={503: {"description": "At least one upstream is not ready"}},
)
async def status(request: Request) -> JSONResponse:
    table: RouteTable = request.app.state.routes
    results = await _probe_all(request)
    healthy = all(result["status"] == "up" for result in results)
    return JSONResponse(
        {
            "status": "ok" if healthy else "degraded",
            "services": {
                route.name: result for route, result in zip(table.routes, results, strict=True)
            },
        },
        status_code=200 if healthy else 503,
    )


@public_router.get(
    "/status",
    summary="Whether every upstream is ready: up or degraded",
    responses={503: {"description": "At least one upstream is not ready"}},
)
async def public_status(request: Request) -> JSONResponse:
    healthy = all(result["status"] == "up" for result in await _probe_all(request))
    return JSONResponse(
        {"status": "up" if healthy else "degraded"}, status_code=200 if healthy else 503
    )


async def _probe_all(request: Request) -> list[dict[str, Any]]:
    table: RouteTable = request.app.state.routes
    client: httpx.AsyncClient = request.app.state.http
    timeout: float = request.app.state.settings.gateway_status_timeout_seconds
    return await asyncio.gather(*(_probe(client, route, timeout) for route in table.routes))


async def _probe(client: httpx.AsyncClient, route: Route, limit: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = await client.get(route.ready_url, timeout=limit)
    except httpx.HTTPError as exc:
        return {"status": "down", "url": route.ready_url, "error": type(exc).__name__}
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    return {
        "status": "up" if response.status_code == 200 else "down",
        "url": route.ready_url,
        "status_code": response.status_code,
        "latency_ms": latency_ms,
    }
