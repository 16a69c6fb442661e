"""Each service starts without the others, says it is not ready, and recovers by itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import httpx
import pytest
from fastapi import FastAPI

from campaign_service.app import create_app as create_campaign_app
from tests.pipeline.conftest import make_campaign_settings, make_worker_settings
from tests.support.campaigns import login_headers
from tests.support.polling import eventually
from tests.support.proxy import TcpProxy
from tests.support.rabbit import PrivateRabbitNode
from tests.support.servers import serve
from tests.support.users import make_user_settings
from user_service.app import create_app as create_user_app
from worker.app import create_app as create_worker_app


@pytest.fixture
async def db_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.close()


def through(proxy: TcpProxy, database_url: str) -> str:
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))


async def ready(app: FastAPI) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://service"
    ) as client:
        return await client.get("/ready")


async def becomes_ready(app: FastAPI, timeout: float = 30) -> None:
    await eventually(
        lambda: ready(app), until=lambda r: r.status_code == 200, timeout=timeout, interval=0.2
    )


@pytest.fixture
async def broker_down(private_rabbit: PrivateRabbitNode) -> AsyncIterator[PrivateRabbitNode]:
    await private_rabbit.stop_app()
    try:
        yield private_rabbit
    finally:
        if not await _running(private_rabbit):
            await private_rabbit.start_app()


async def _running(node: PrivateRabbitNode) -> bool:
    try:
        await node._run("rabbitmq-diagnostics", "-q", "-n", node.name, "check_running")
    except RuntimeError:
        return False
    return True


class TestStartsAlone:
    async def test_user_service_without_its_database(
        self, db_proxy: TcpProxy, database_url: str, tenant: str
    ) -> None:
        db_proxy.down()
        app = create_user_app(make_user_settings(through(db_proxy, database_url)))
        async with app.router.lifespan_context(app):
            not_ready = await ready(app)
            db_proxy.up()
            await becomes_ready(app)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://user-service"
            ) as client:
                headers = await login_headers(client, tenant)

        assert not_ready.status_code == 503
        assert not_ready.json()["checks"] == {"database": "unreachable"}
        assert headers["Authorization"].startswith("Bearer ")

    async def test_requests_during_a_database_outage_get_a_json_503(
        self, db_proxy: TcpProxy, database_url: str, tenant: str
    ) -> None:
        app = create_user_app(make_user_settings(through(db_proxy, database_url)))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://user-service"
            ) as client,
        ):
            db_proxy.down()
            credentials = {"tenant_id": tenant, "email": "a@example.com", "password": "p" * 12}
            during = await client.post("/register", json=credentials)
            db_proxy.up()
            after = await eventually(
                lambda: client.post("/register", json=credentials),
                until=lambda response: response.status_code != 503,
            )

        assert during.status_code == 503
        assert during.json() == {"detail": "The database is unavailable; try again shortly"}
        assert during.headers["retry-after"]
        assert after.status_code == 201

    async def test_campaign_service_without_database_broker_or_keys(
        self,
        db_proxy: TcpProxy,
        broker_down: PrivateRabbitNode,
        database_url: str,
        user_app: FastAPI,
        user_client: httpx.AsyncClient,
        tenant: str,
    ) -> None:
        headers = await login_headers(user_client, tenant)
        db_proxy.down()
        async with serve(user_app, lifespan="off") as user_url:
            keys_proxy = TcpProxy("127.0.0.1", urlsplit(user_url).port or 0)
            await keys_proxy.start()
            keys_proxy.down()
            settings = make_campaign_settings(
                through(db_proxy, database_url),
                broker_down.url,
                jwt_jwks_url=f"http://127.0.0.1:{keys_proxy.port}/.well-known/jwks.json",
                rabbitmq_reconnect_seconds=0.5,
            )
            app = create_campaign_app(settings)  # a real HTTP client for the JWKS
            try:
                async with (
                    app.router.lifespan_context(app),
                    httpx.AsyncClient(
                        transport=httpx.ASGITransport(app=app), base_url="http://campaigns"
                    ) as client,
                ):
                    not_ready = await ready(app)
                    alive = await client.get("/health")
                    without_keys = await client.get("/campaigns", headers=headers)

                    db_proxy.up()
                    keys_proxy.up()
                    await broker_down.start_app()
                    await becomes_ready(app)
                    listed = await eventually(
                        lambda: client.get("/campaigns", headers=headers),
                        until=lambda r: r.status_code == 200,
                        timeout=10,
                    )
            finally:
                await keys_proxy.close()

        assert alive.status_code == 200
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"] == {"database": "unreachable", "broker": "unreachable"}
        # The caller's token is fine; the service cannot check it yet: 503, not 401.
        assert without_keys.status_code == 503
        assert without_keys.headers["retry-after"]
        assert listed.json() == {"items": [], "next_cursor": None}

    async def test_worker_recovers_when_a_declaration_is_refused(
        self, database_url: str, amqp_url: str
    ) -> None:
        # Someone declared the worker's queue with other arguments: declaring it fails
        # (PRECONDITION_FAILED) until the queue is fixed; the worker must say so and recover.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue("worker.campaign.created", durable=True)
            app = create_worker_app(
                make_worker_settings(database_url, amqp_url, rabbitmq_reconnect_seconds=0.5)
            )
            async with app.router.lifespan_context(app):
                not_ready = await eventually(lambda: ready(app), until=lambda r: True)
                await asyncio.sleep(0.5)
                still_not_ready = await ready(app)
                await (await connection.channel()).queue_delete("worker.campaign.created")
                await becomes_ready(app)

        assert not_ready.status_code == 503
        assert still_not_ready.json()["checks"]["broker"] == "unreachable"

    async def test_worker_without_its_broker(
        self, broker_down: PrivateRabbitNode, database_url: str
    ) -> None:
        app = create_worker_app(
            make_worker_settings(database_url, broker_down.url, rabbitmq_reconnect_seconds=0.5)
        )
        async with app.router.lifespan_context(app):
            not_ready = await ready(app)
            await broker_down.start_app()
            await becomes_ready(app)
            recovered = await ready(app)

        assert not_ready.status_code == 503
        assert not_ready.json()["checks"]["broker"] == "unreachable"
        assert not_ready.json()["checks"]["consumer"] == "unreachable"
        assert recovered.json()["checks"] == {"database": "ok", "broker": "ok", "consumer": "ok"}
