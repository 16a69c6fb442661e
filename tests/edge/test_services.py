"""The limits of a service reached without the edge (from inside the platform): user_service as
a real process, started with the server options of docker/start and scripts/run-local, through
raw sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from campaign_service.app import create_app as create_campaign_app
from campaign_service.settings import CampaignServiceSettings
from gateway.app import create_app as create_gateway_app
from shared.web import HeaderLimitsMiddleware
from tests.edge.test_edge import MiB, fields, request
from tests.support.edge import read_response, read_until_closed, rss_kib, server_options, status_of
from tests.support.processes import ServiceProcess
from tests.support.users import new_private_key_pem
from user_service.app import create_app as create_user_app

CONCURRENCY = 4


@pytest.fixture(scope="module")
async def user_service(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceProcess]:
    logs = tmp_path_factory.mktemp("service-limits")
    process = ServiceProcess.web(
        "user_service.main:app",
        {"DATABASE_URL": database_url, "JWT_PRIVATE_KEY": new_private_key_pem()},
        logs / "user_service.log",
    )
    process.args += server_options(CONCURRENCY)
    try:
        await process.start()
        await process.wait_ready()
        yield process
    finally:
        await process.stop()


async def answer(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_until_closed(reader, timeout=10)
    finally:
        writer.close()


async def test_more_than_100_fields_is_431(user_service: ServiceProcess) -> None:
    response = await answer(user_service.port, request(*fields(100), path="/health"))

    assert status_of(response) == 431
    assert user_service.logged("request refused: header section too large")


async def test_100_fields_pass(user_service: ServiceProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", user_service.port)
    try:
        writer.write(request(*fields(99), path="/health"))  # and Host
        status, _ = await read_response(reader)
    finally:
        writer.close()

    assert status == 200


async def test_a_whole_header_section_over_16_kib_is_431(user_service: ServiceProcess) -> None:
    response = await answer(user_service.port, request(*fields(17, 1000), path="/health"))

    assert status_of(response) == 431


async def test_unfinished_1_mib_header_sections_are_closed_in_bounded_memory(
    user_service: ServiceProcess,
) -> None:
    assert user_service.process is not None
    before = rss_kib(user_service.process.pid)
    line = b"X-Fill: " + b"a" * 1000 + b"\r\n"
    flood = b"GET /health HTTP/1.1\r\nHost: s\r\n" + line * (MiB // len(line))

    async def hold() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", user_service.port)
        try:
            try:
                writer.write(flood)
                await writer.drain()
            except ConnectionError:
                pass
            return await read_until_closed(reader, timeout=10)
        finally:
            writer.close()

    # Sequential batches under the concurrency cap: each one meets the parser's limit.
    answers = []
    for _ in range(50 // CONCURRENCY + 1):
        answers += await asyncio.gather(*(hold() for _ in range(CONCURRENCY - 1)))
    growth_mib = (rss_kib(user_service.process.pid) - before) / 1024

    print(f"user_service RSS growth: {growth_mib:.2f} MiB")
    assert growth_mib < 50
    assert {status_of(answer) for answer in answers} <= {400, None}


async def test_beyond_the_concurrency_cap_503(user_service: ServiceProcess) -> None:
    # Open connections count: CONCURRENCY idle ones, then a request on one more.
    idle = [
        await asyncio.open_connection("127.0.0.1", user_service.port) for _ in range(CONCURRENCY)
    ]
    try:
        response = await answer(user_service.port, request(path="/health"))
    finally:
        for _, writer in idle:
            writer.close()

    assert status_of(response) == 503


@pytest.mark.parametrize("create", [create_user_app, create_gateway_app, "campaign_service"])
def test_every_service_checks_its_header_section(create: object, database_url: str) -> None:
    if create == "campaign_service":
        app: FastAPI = create_campaign_app(CampaignServiceSettings(database_url=database_url))
    else:
        assert callable(create)
        app = create()

    classes: list[object] = [middleware.cls for middleware in app.user_middleware]
    assert HeaderLimitsMiddleware in classes
