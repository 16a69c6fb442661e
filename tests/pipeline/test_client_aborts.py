"""A client that goes away in the middle of its request body is not a server error: the request
ends quietly (an info line, a count of client aborts), at the gateway and at the services."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI

from gateway.app import create_app as create_gateway_app
from gateway.settings import GatewaySettings, RouteConfig
from shared.settings import Environment
from tests.support.metrics import value
from tests.support.polling import eventually
from tests.support.servers import serve

ABORTS = 20


async def abort_mid_body(url: str, path: str) -> None:
    """Send a POST whose body stops short of its Content-Length, then hang up."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        'Content-Length: 1000\r\nAuthorization: Bearer x\r\n\r\n{"name": '.encode()
    )
    await writer.drain()
    await asyncio.sleep(0.05)  # the server has started reading the body
    writer.transport.abort()
    del reader


def gateway_app() -> FastAPI:
    settings = GatewaySettings(
        _env_file=None,
        environment=Environment.TEST,
        gateway_internal_port=None,
        gateway_routes=[
            RouteConfig(name="nowhere", prefix="/api/x", upstream="http://127.0.0.1:9")
        ],
    )
    return create_gateway_app(settings)


@pytest.mark.parametrize("which", ["gateway", "campaign_service", "user_service"])
async def test_a_body_cut_short_is_no_server_error(
    which: str,
    campaign_app: FastAPI,
    user_app: FastAPI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, path = {
        "gateway": (gateway_app(), "/api/x/campaigns"),
        "campaign_service": (campaign_app, "/campaigns"),
        "user_service": (user_app, "/login"),
    }[which]
    # The gateway counts on its internal port (its own app), a service on its own /metrics.
    metered = app.state.internal_app if which == "gateway" else app
    with caplog.at_level(logging.DEBUG):
        async with serve(app, lifespan="on" if which == "gateway" else "off") as url:
            await asyncio.gather(*(abort_mid_body(url, path) for _ in range(ABORTS)))
            counted = await eventually(
                lambda: value(metered, "http_server_client_aborts_total"),
                until=lambda n: n >= ABORTS,
                what="client aborts",
            )

    assert counted == ABORTS
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert not [r for r in caplog.records if r.exc_info]
