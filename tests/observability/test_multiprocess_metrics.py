"""Metrics of a service started as several processes (``WEB_CONCURRENCY=2``, by its documented
start command ``uvicorn <service>.main:app``) add up: any process's /metrics answers the totals
of all of them, each start counts from zero, a killed process's in-flight requests leave the
totals, and the gateway's internal port is shared by one start only (shared/multiprocess.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector

from shared.multiprocess import live_gauge_pid
from tests.support.metrics import parse, promtool_check
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess, free_port

REQUESTS = 60  # sent 20 at a time, on connections of their own, so both processes take some
HEALTH_COUNT = "http_server_request_duration_seconds_count"


def health_count(text: str) -> float:
    labels = frozenset({"method": "GET", "route": "/health", "status_code": "200"}.items())
    return parse(text).get((HEALTH_COUNT, labels), 0.0)


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:  # a connection of its own: any process may take it
        return await client.get(url)


async def send_health_requests(url: str, count: int) -> None:
    for start in range(0, count, 20):
        responses = await asyncio.gather(
            *(get(f"{url}/health") for _ in range(min(20, count - start)))
        )
        assert all(response.status_code == 200 for response in responses)


async def scrapes(url: str, count: int = 12) -> list[str]:
    """``count`` scrapes, each on a new connection: they land on different processes."""
    texts = []
    for _ in range(count):
        response = await get(f"{url}/metrics")
        assert response.status_code == 200, response.text
        texts.append(response.text)
    return texts


def start_directories(base: Path) -> list[Path]:
    return sorted(entry for entry in base.iterdir() if entry.is_dir()) if base.exists() else []


def processes_that_served(directory: Path) -> set[str]:
    """The pids whose request histogram has samples (prometheus_client's file per process)."""
    return {path.stem.rsplit("_", 1)[1] for path in directory.glob("histogram_*.db")}


@contextlib.asynccontextmanager
async def started(process: ServiceProcess, ready_url: str) -> AsyncIterator[ServiceProcess]:
    """Start ``process``, wait for ``ready_url`` to answer 200, stop it with SIGTERM (uvicorn's
    supervisor then stops its workers, who mark themselves dead) at the end."""
    await process.start()
    try:

        async def answers() -> bool:
            assert process.process is not None
            if process.process.returncode is not None:
                raise AssertionError(f"exited early:\n{process.log_path.read_text()[-3000:]}")
            try:
                return (await get(ready_url)).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(answers, timeout=30, interval=0.1, what=f"{ready_url} answering")
        yield process
    finally:
        if process.process is not None and process.process.returncode is None:
            process.signal(signal.SIGTERM)
            try:
                await process.wait(timeout=30)
            finally:
                await process.stop()


def live_processes(directory: Path) -> dict[int, float]:
    """Each process with live gauges in ``directory``: its ``http_server_active_requests``."""
    active = {}
    for path in directory.iterdir():
        pid = live_gauge_pid(path.name)
        if pid is None:
            continue
        with contextlib.suppress(FileNotFoundError):  # marked dead meanwhile
            for metric in MultiProcessCollector.merge([str(path)]):  # type: ignore[no-untyped-call]
                for sample in metric.samples:
                    if sample.name == "http_server_active_requests":
                        active[pid] = sample.value
    return active


def active_requests(text: str) -> float:
    return parse(text)[("http_server_active_requests", frozenset())]


@contextlib.asynccontextmanager
async def request_in_flight(url: str) -> AsyncIterator[None]:
    """A POST whose body never arrives whole: in flight until the connection closes."""
    _, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        writer.write(
            b"POST /api/x/campaigns HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        await writer.drain()
        yield
    finally:
        writer.transport.abort()


def gateway(
    base: Path, logs: Path, *, processes: int | None, internal_port: int | None = None
) -> tuple[ServiceProcess, str]:
    """The gateway by its start command; returns it and the URL of its internal port. Its one
    route leads nowhere."""
    internal_port = internal_port or free_port()
    routes = [{"name": "nowhere", "prefix": "/api/x", "upstream": "http://127.0.0.1:9"}]
    process = ServiceProcess.web(
        "gateway.main:app",
        {
            "GATEWAY_ROUTES": json.dumps(routes),
            "GATEWAY_INTERNAL_PORT": str(internal_port),
            "METRICS_MULTIPROCESS_DIR": str(base),
        },
        logs,
    )
    process.env.pop("WEB_CONCURRENCY", None)
    if processes is not None:
        process.env["WEB_CONCURRENCY"] = str(processes)
    return process, f"http://127.0.0.1:{internal_port}"


class TestCampaignServiceWithTwoProcesses:
    async def test_every_scrape_reports_the_totals_of_both_processes(
        self, database_url: str, amqp_url: str, tmp_path: Path
    ) -> None:
        base = tmp_path / "metrics"
        service = ServiceProcess.web(
            "campaign_service.main:app",
            {
                "DATABASE_URL": database_url,
                "RABBITMQ_URL": amqp_url,
                "WEB_CONCURRENCY": "2",
                "METRICS_MULTIPROCESS_DIR": str(base),
            },
            tmp_path / "campaign_service.log",
        )
        async with started(service, f"{service.url}/ready"):
            [directory] = start_directories(base)
            sent = 0
            while len(processes_that_served(directory)) < 2:  # bounded: see the assertion
                await send_health_requests(service.url, REQUESTS)
                sent += REQUESTS
                assert sent <= 10 * REQUESTS, "the requests all went to one process"

            texts = await eventually(
                lambda: scrapes(service.url),
                until=lambda texts: all(health_count(text) == sent for text in texts),
                timeout=10,
                what=f"every scrape counting {sent} requests",
            )

        for text in texts:
            samples = parse(text)
            # Gauges read at scrape time: one value (the most recent), never one per process.
            assert ("outbox_pending_messages", frozenset()) in samples, text
            queue = frozenset({("queue", "worker.campaign.created")})
            # (The relay may have published an event another test left in the shared outbox.)
            assert ("broker_queue_messages", queue) in samples, text
            assert samples[("broker_queue_consumers", queue)] == 0  # no worker in this test
            assert not any("pid" in dict(labels) for _, labels in samples)
        assert await promtool_check(texts[0]) == ""


class TestGatewayStarts:
    async def test_each_start_counts_from_zero_and_removes_the_last_ones_directory(
        self, tmp_path: Path
    ) -> None:
        base = tmp_path / "metrics"
        first, first_internal = gateway(base, tmp_path / "first.log", processes=2)
        async with started(first, f"{first_internal}/metrics"):
            [first_directory] = start_directories(base)
            await send_health_requests(first.url, REQUESTS)
            await eventually(
                lambda: scrapes(first_internal),
                until=lambda texts: all(health_count(text) == REQUESTS for text in texts),
                what="the first start's totals",
            )
        assert start_directories(base) == [first_directory]  # its supervisor is gone now

        second, second_internal = gateway(base, tmp_path / "second.log", processes=2)
        async with started(second, f"{second_internal}/metrics"):
            [second_directory] = start_directories(base)
            assert second_directory != first_directory
            await send_health_requests(second.url, 20)
            texts = await eventually(
                lambda: scrapes(second_internal),
                until=lambda texts: all(health_count(text) == 20 for text in texts),
                what="the second start's own totals",
            )
        assert await promtool_check(texts[0]) == ""

    async def test_one_process_keeps_its_own_registry(self, tmp_path: Path) -> None:
        base = tmp_path / "metrics"
        single, internal = gateway(base, tmp_path / "single.log", processes=None)
        async with started(single, f"{internal}/metrics"):
            await send_health_requests(single.url, 5)
            [text] = await scrapes(internal, count=1)

        assert health_count(text) == 5
        assert start_directories(base) == []

    async def test_a_killed_process_leaves_the_totals_at_the_next_scrape(
        self, tmp_path: Path
    ) -> None:
        base = tmp_path / "metrics"
        service, internal = gateway(base, tmp_path / "gateway.log", processes=2)
        async with started(service, f"{internal}/metrics"):
            [directory] = start_directories(base)
            await eventually(
                lambda: asyncio.to_thread(live_processes, directory),
                until=lambda active: len(active) == 2,
                timeout=30,
                what="both processes started",
            )
            async with request_in_flight(service.url):
                active = await eventually(
                    lambda: asyncio.to_thread(live_processes, directory),
                    until=lambda active: sorted(active.values()) == [0, 1],
                    what="one process serving the request",
                )
                [serving] = [pid for pid, value in active.items() if value == 1]
                [text] = await scrapes(internal, count=1)
                assert active_requests(text) == 1

                os.kill(serving, signal.SIGKILL)  # as uvicorn kills a worker that stops answering

                await eventually(
                    lambda: scrapes(internal, count=4),
                    until=lambda texts: all(active_requests(text) == 0 for text in texts),
                    timeout=30,
                    what="the killed process's request out of every scrape's total",
                )
                assert serving not in live_processes(directory)


class TestGatewayInternalPort:
    async def test_a_second_start_on_the_same_port_fails_while_the_first_runs(
        self, tmp_path: Path
    ) -> None:
        base = tmp_path / "metrics"
        first, internal = gateway(base, tmp_path / "first.log", processes=2)
        port = int(internal.rsplit(":", 1)[1])
        async with started(first, f"{internal}/metrics"):
            second, _ = gateway(base, tmp_path / "second.log", processes=2, internal_port=port)
            await second.start()
            try:
                await second.wait(timeout=60)  # uvicorn stops a start whose worker cannot start
            finally:
                await second.stop()
            assert f"port {port} is in use by another start" in second.log_path.read_text()

            await send_health_requests(first.url, 20)
            await eventually(  # every scrape of the port reaches the first start
                lambda: scrapes(internal),
                until=lambda texts: all(health_count(text) == 20 for text in texts),
                what="the first start's totals on every scrape",
            )
