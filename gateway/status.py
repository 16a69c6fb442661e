"""The gateway's own endpoints: its route table, and each upstream's readiness."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.routes import Route, RouteTable

router = APIRouter(prefix="/api/gateway", tags=["gateway"])


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
    client: httpx.AsyncClient = request.app.state.http
    timeout: float = request.app.state.settings.gateway_status_timeout_seconds
    results = await asyncio.gather(*(_probe(client, route, timeout) for route in table.routes))
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
