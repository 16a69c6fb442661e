"""The platform as separate processes (user_service, campaign_service, worker), each exporting
its spans to a receiver inside the test, on the real PostgreSQL and a private RabbitMQ node
(which the slow-path test stops and starts)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.otlp import OtlpReceiver
from tests.support.processes import ServiceProcess
from tests.support.rabbit import PrivateRabbitNode
from tests.support.users import PASSWORD, new_private_key_pem


@dataclass
class Stack:
    receiver: OtlpReceiver
    user: ServiceProcess
    campaigns: ServiceProcess
    worker: ServiceProcess
    node: PrivateRabbitNode

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.user, self.campaigns, self.worker]

    async def login(self, tenant: str) -> dict[str, str]:
        credentials = {"tenant_id": tenant, "email": "ada@example.com", "password": PASSWORD}
        async with httpx.AsyncClient(base_url=self.user.url) as client:
            await client.post("/register", json=credentials)
            response = await client.post("/login", json=credentials)
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture(scope="module")
async def stack(
    database_url: str, private_rabbit: PrivateRabbitNode, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    receiver = OtlpReceiver()
    async with receiver.running():
        async for stack in _stack(receiver, database_url, private_rabbit, tmp_path_factory):
            yield stack


async def _stack(
    receiver: OtlpReceiver,
    database_url: str,
    private_rabbit: PrivateRabbitNode,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    logs = tmp_path_factory.mktemp("stack-logs")
    common = {
        "DATABASE_URL": database_url,
        "RABBITMQ_URL": private_rabbit.url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    user = ServiceProcess.web(
        "user_service.main:app",
        # DEBUG: a password must stay out of the logs at every level.
        {**common, "JWT_PRIVATE_KEY": new_private_key_pem(), "LOG_LEVEL": "DEBUG"},
        logs / "user_service.log",
    )
    campaigns = ServiceProcess.web(
        "campaign_service.main:app",
        {
            **common,
            "JWT_JWKS_URL": f"{user.url}/.well-known/jwks.json",
            "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
        },
        logs / "campaign_service.log",
    )
    worker = ServiceProcess.worker(
        {**common, "WORKER_RETRY_DELAYS_SECONDS": "0.3,0.6", "WORKER_MAX_ATTEMPTS": "3"},
        logs / "worker.log",
    )
    stack = Stack(receiver, user, campaigns, worker, private_rabbit)
    try:
        for process in stack.processes:
            await process.start()
        for process in stack.processes:
            await process.wait_ready()
        yield stack
    finally:
        for process in stack.processes:
            await process.stop()
