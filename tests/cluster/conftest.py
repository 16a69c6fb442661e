"""The platform on a RabbitMQ cluster of its own, as docker-compose.cluster.yml runs it: three
private nodes behind Debian's haproxy (tests.support.cluster), a database of its own,
campaign_service and two workers as processes, every one of them pointed at haproxy. Set up once
for the module (about half a minute); removed at its end, whatever happened.

The drills' timings are printed (``-s``) and summed up at the end of the run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from shared.messaging import WORKER_QUEUE_NAME
from shared.migrate import migrate
from tests.conftest import ADMIN_DATABASE_URL
from tests.support.cluster import RabbitCluster
from tests.support.databases import create_database, drop_database
from tests.support.processes import ServiceProcess
from user_service.settings import UserServiceSettings
from user_service.tokens.keys import load_signing_keys

REPORT: list[str] = []


def report(line: str) -> None:
    """A line of the drills' report: printed now, and again in the run's summary."""
    print(line)
    REPORT.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("RabbitMQ cluster drills")
        for line in REPORT:
            terminalreporter.write_line(line)


@dataclass
class ClusterPlatform:
    cluster: RabbitCluster
    campaigns: ServiceProcess
    workers: list[ServiceProcess]

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.campaigns, *self.workers]

    def logs(self) -> str:
        """The end of every process's log, for a failure's message."""
        return "\n".join(
            f"--- {process.log_path.name}\n{process.log_path.read_text()[-3000:]}"
            for process in self.processes
        )


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RabbitCluster]:
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.remove()


@pytest.fixture(scope="module")
async def cluster_database_url(run_id: str) -> AsyncIterator[str]:
    """A database of the drills' own: the relay of their campaign_service publishes every due
    outbox row it finds, and other tests may leave some in the run's database."""
    name = f"campaigns_cluster_{run_id}"
    url = await create_database(ADMIN_DATABASE_URL, name)
    try:
        await migrate(url)
        yield url
    finally:
        await drop_database(ADMIN_DATABASE_URL, name)


@pytest.fixture(scope="module")
async def platform(
    cluster: RabbitCluster,
    cluster_database_url: str,
    user_settings: UserServiceSettings,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ClusterPlatform]:
    """campaign_service and two workers, started as users start them, with the production
    defaults for everything that concerns the broker (reconnection, outbox timings)."""
    logs = tmp_path_factory.mktemp("cluster-platform-logs")
    public_key = load_signing_keys(user_settings).signing_key.as_pem(private=False).decode()
    common = {"DATABASE_URL": cluster_database_url, "RABBITMQ_URL": cluster.url}
    campaigns = ServiceProcess.web(
        "campaign_service.main:app",
        {**common, "JWT_PUBLIC_KEYS": public_key},
        logs / "campaign_service.log",
    )
    workers = [ServiceProcess.worker(common, logs / f"worker-{n}.log") for n in (1, 2)]
    platform = ClusterPlatform(cluster, campaigns, workers)
    try:
        for process in platform.processes:
            await process.start()
        for process in platform.processes:
            await process.wait_ready(timeout=60)
        yield platform
    finally:
        for process in platform.processes:
            await process.stop()


@pytest.fixture
async def cluster_db(cluster_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(cluster_database_url.replace("+asyncpg", ""))
    yield connection
    await connection.close()


@pytest.fixture
async def campaign_api(platform: ClusterPlatform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=platform.campaigns.url, timeout=10) as client:
        yield client


QUEUE = WORKER_QUEUE_NAME
