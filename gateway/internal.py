"""The gateway's internal port (``GATEWAY_INTERNAL_PORT``, 9080): its metrics, its API docs,
the route table with the upstream addresses and each upstream's readiness in detail. Prometheus
scrapes it; compose does not publish it. It is served by a second uvicorn server in the gateway's
process, started and stopped with the public one (a signal stops the internal server first,
which hands the signal on to the public one). In a multi-process start (``WEB_CONCURRENCY``) the
processes share the internal port (``SO_REUSEPORT``): a scrape reaches one of them, which answers
the totals of all (shared/multiprocess.py); another multi-process start on the same port fails
to start instead of sharing it too (``port_of_this_start``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from gateway.settings import GatewaySettings
from gateway.status import router as status_router
from shared.errors import install_error_handlers
from shared.metrics import metrics_router
from shared.multiprocess import multiprocess_directory, port_of_this_start
from shared.telemetry import NO_NATIVE_TELEMETRY
from shared.web import health_router


def create_internal_app(public: FastAPI, registry: CollectorRegistry, timeout: float) -> FastAPI:
    """The internal endpoints, reading what the public app's lifespan put on its state."""
    app = FastAPI(
        title="gateway (internal)",
        summary="The gateway's metrics, route table and upstream status, for operators.",
        version="0.1.0",
        telemetry=NO_NATIVE_TELEMETRY,
    )
    app.state = public.state  # the route table, the pooled client, the settings
    install_error_handlers(app)
    app.include_router(health_router(dict, timeout=timeout))
    app.include_router(status_router)
    app.include_router(metrics_router(registry))
    return app


@contextlib.asynccontextmanager
async def serving(app: FastAPI, settings: GatewaySettings) -> AsyncIterator[None]:
    """Serve ``app`` on the internal port for as long as the block runs (not at all when
    ``GATEWAY_INTERNAL_PORT`` is unset)."""
    if settings.gateway_internal_port is None:
        yield
        return
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.gateway_internal_host,
            port=settings.gateway_internal_port,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
        )
    )
    with contextlib.ExitStack() as held:
        sockets = None
        if multiprocess_directory() is not None:  # the sibling processes of this start bind it too
            held.enter_context(port_of_this_start(settings.gateway_internal_port))
            sockets = [
                _shared_socket(settings.gateway_internal_host, settings.gateway_internal_port)
            ]
        task = asyncio.create_task(server.serve(sockets), name="gateway-internal-port")
        while not server.started:
            if task.done():
                task.result()  # its error (the port in use): the gateway does not start
                raise RuntimeError("the internal port stopped as it started")
            await asyncio.sleep(0.01)
        try:
            yield
        finally:
            server.should_exit = True
            await task


def _shared_socket(host: str, port: int) -> socket.socket:
    """A socket on ``host:port`` that other processes of the same user may bind as well; the
    kernel spreads the connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
