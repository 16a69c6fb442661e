from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from campaign_service.app import create_app as create_campaign_app
from campaign_service.settings import CampaignServiceSettings
from shared.events import CampaignCreated
from shared.settings import Environment
from tests.support.campaigns import login_headers
from tests.support.polling import eventually
from tests.support.users import JWKS_URL
from worker.app import create_app as create_worker_app
from worker.settings import WorkerSettings

CAMPAIGN_SERVICE_URL = "http://campaign-service"
# Short retry ladder so the tests wait fractions of a second, not the defaults' 1 s, 5 s, 30 s.
TEST_RETRY_DELAYS = (0.3, 0.6)
TEST_MAX_ATTEMPTS = 3


def make_campaign_settings(
    database_url: str, amqp_url: str, **overrides: Any
) -> CampaignServiceSettings:
    values: dict[str, Any] = {
        "environment": Environment.TEST,
        "database_url": database_url,
        "rabbitmq_url": amqp_url,
        "jwt_jwks_url": JWKS_URL,
        "outbox_poll_interval_seconds": 0.2,
        "outbox_claim_after_seconds": 1.0,
        **overrides,
    }
    return CampaignServiceSettings(_env_file=None, **values)


def make_worker_settings(database_url: str, amqp_url: str, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "environment": Environment.TEST,
        "database_url": database_url,
        "rabbitmq_url": amqp_url,
        "worker_retry_delays_seconds": TEST_RETRY_DELAYS,
        "worker_max_attempts": TEST_MAX_ATTEMPTS,
        "worker_prefetch": 10,
        "worker_graceful_timeout_seconds": 5.0,
        "worker_db_retry_max_seconds": 0.5,
        **overrides,
    }
    return WorkerSettings(_env_file=None, **values)


async def wait_ready(app: FastAPI, timeout: float = 20.0) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://probe"
    ) as client:

        async def status() -> int:
            return (await client.get("/ready")).status_code

        await eventually(status, until=lambda code: code == 200, timeout=timeout, what="ready")


@pytest.fixture
def campaign_settings(database_url: str, amqp_url: str) -> CampaignServiceSettings:
    return make_campaign_settings(database_url, amqp_url)


@pytest.fixture
async def campaign_app(
    campaign_settings: CampaignServiceSettings, user_client: httpx.AsyncClient
) -> AsyncIterator[FastAPI]:
    app = create_campaign_app(campaign_settings, jwks_client=user_client)
    async with app.router.lifespan_context(app):
        await wait_ready(app)
        yield app


@pytest.fixture
async def campaign_client(campaign_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=campaign_app), base_url=CAMPAIGN_SERVICE_URL
    ) as client:
        yield client


@pytest.fixture
def worker_settings(database_url: str, amqp_url: str) -> WorkerSettings:
    return make_worker_settings(database_url, amqp_url)


@pytest.fixture
async def worker(worker_settings: WorkerSettings) -> AsyncIterator[FastAPI]:
    """A worker running in this process (its broker, its consumer, its database pool)."""
    app = create_worker_app(worker_settings)
    async with app.router.lifespan_context(app):
        await wait_ready(app)
        yield app


@pytest.fixture
async def headers(user_client: httpx.AsyncClient, tenant: str) -> dict[str, str]:
    return await login_headers(user_client, tenant)


@pytest.fixture
async def other_headers(user_client: httpx.AsyncClient, other_tenant: str) -> dict[str, str]:
    return await login_headers(user_client, other_tenant)


@pytest.fixture
def executions(monkeypatch: pytest.MonkeyPatch) -> list[CampaignCreated]:
    """The events the worker executes (its simulated work), in order."""
    import worker.processing
    from worker.simulation import execute

    seen: list[CampaignCreated] = []

    async def recording(event: CampaignCreated, **kwargs: Any) -> None:
        seen.append(event)
        await execute(event, **kwargs)

    monkeypatch.setattr(worker.processing, "execute", recording)
    return seen
