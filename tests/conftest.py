"""Test session: a database of its own (created, migrated, dropped), real connections only."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.migrate import migrate
from tests.support.databases import create_database, drop_database
from tests.support.processes import ROOT, free_port
from tests.support.rabbit import PrivateRabbitNode, RabbitAdmin, new_vhost_name, vhost_url
from tests.support.spans import Spans, recorded_spans
from tests.support.users import client_of, make_user_settings, new_address
from user_service.app import create_app as create_user_app
from user_service.settings import UserServiceSettings

ADMIN_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
async def database_url(run_id: str) -> AsyncIterator[str]:
    """``postgresql+asyncpg://…`` of a fresh database, migrated to head, dropped at the end."""
    name = f"campaigns_test_{run_id}"
    url = await create_database(ADMIN_DATABASE_URL, name)
    try:
        await migrate(url)
        yield url
    finally:
        await drop_database(ADMIN_DATABASE_URL, name)


@pytest.fixture(scope="session")
async def db_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine for tests to look at what the services wrote."""
    engine = create_async_engine(database_url, pool_size=4)
    yield engine
    await engine.dispose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection, for assertions on rows."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    yield connection
    await connection.close()


@pytest.fixture
def spans() -> Iterator[Spans]:
    """Spans recorded in memory by a tracer provider of the test's own."""
    with recorded_spans() as recorded:
        yield recorded


@pytest.fixture
def tenant() -> str:
    """A tenant of this test's own: tests share the database, never each other's rows."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def other_tenant() -> str:
    return f"o-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in tests come from arguments, never from the developer's environment."""
    for name in list(os.environ):
        if name.startswith(("JWT_", "DATABASE_", "RABBITMQ_", "WORKER_", "OUTBOX_")) or name in (
            "ENVIRONMENT",
            "LOG_LEVEL",
        ):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def user_settings(database_url: str) -> UserServiceSettings:
    return make_user_settings(database_url)


@pytest.fixture(scope="session")
async def user_app(user_settings: UserServiceSettings) -> AsyncIterator[FastAPI]:
    app = create_user_app(user_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def user_client(user_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client calling from an address of this test's own: failed logins count per client
    address too, and one test's must never throttle another's."""
    async with client_of(user_app, new_address()) as client:
        yield client


@pytest.fixture(scope="session")
async def rabbit_admin() -> AsyncIterator[RabbitAdmin]:
    admin = RabbitAdmin()
    yield admin
    await admin.close()


@pytest.fixture
async def vhost(rabbit_admin: RabbitAdmin) -> AsyncIterator[str]:
    """A RabbitMQ vhost of this test's own, deleted at its end."""
    name = new_vhost_name()
    await rabbit_admin.create_vhost(name)
    yield name
    await rabbit_admin.delete_vhost(name)


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return vhost_url(vhost)


@pytest.fixture(scope="session")
async def private_rabbit() -> AsyncIterator[PrivateRabbitNode]:
    """A RabbitMQ node of this test run's own: tests may stop it without touching the shared one.

    It runs with the platform's rabbitmq/rabbitmq.conf, so the node starting at all shows that
    file is valid (minus the management port: this node has no plugins).
    """
    config = "\n".join(
        line
        for line in (ROOT / "rabbitmq" / "rabbitmq.conf").read_text().splitlines()
        if not line.startswith("management.")
    )
    node = PrivateRabbitNode(port=free_port(), dist_port=free_port(), extra_config=config)
    await node.start()
    try:
        yield node
    finally:
        await node.remove()
