"""The edge's limits through real sockets: nginx (nginx/edge.conf, rendered as scripts/run-local
renders it) in front of a real gateway process, routing to an upstream served in this process.

The timeouts are shortened to 1 s here; the defaults (10 s headers, 30 s body, 5 s keep-alive)
are the same settings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request

from tests.support.edge import (
    Nginx,
    read_response,
    read_until_closed,
    rss_kib,
    server_options,
    status_of,
)
from tests.support.metrics import parse
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess, free_port
from tests.support.servers import serve

HEADER_TIMEOUT = BODY_TIMEOUT = KEEPALIVE_TIMEOUT = 1.0
MAX_REQUESTS = 2  # requests in flight at the edge
# What the gateway process is started with (as in scripts/run-local and docker/start).
GATEWAY_SERVER_OPTIONS = [
    "--proxy-headers",
    "--forwarded-allow-ips",
    "127.0.0.1",
    *server_options(),
]
MiB = 1024 * 1024


class Upstream:
    def __init__(self) -> None:
        self.app = FastAPI()
        self.release = asyncio.Event()
        self.waiting = 0
        self.seen: list[dict[str, str]] = []

        @self.app.api_route("/echo", methods=["GET", "POST"])
        async def echo(request: Request) -> dict[str, object]:
            body = await request.body()
            self.seen.append(dict(request.headers))
            return {"bytes": len(body), "x-forwarded-for": request.headers.get("x-forwarded-for")}

        @self.app.get("/slow")
        async def slow() -> dict[str, str]:
            self.waiting += 1
            try:
                await self.release.wait()
            finally:
                self.waiting -= 1
            return {"status": "released"}


@dataclass
class Stack:
    upstream: Upstream
    gateway: ServiceProcess
    internal_port: int
    edge: Nginx

    async def gateway_metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{self.internal_port}/metrics")
        return parse(response.text)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    directory = tmp_path_factory.mktemp("edge")
    upstream = Upstream()
    async with serve(upstream.app, lifespan="off") as upstream_url:
        internal_port = free_port()
        routes = [{"name": "echo", "prefix": "/api/echo", "upstream": upstream_url}]
        gateway = ServiceProcess.web(
            "gateway.main:app",
            {
                "GATEWAY_ROUTES": json.dumps(routes),
                "GATEWAY_INTERNAL_PORT": str(internal_port),
                "LOG_LEVEL": "INFO",
            },
            directory / "gateway.log",
        )
        gateway.args += GATEWAY_SERVER_OPTIONS
        edge = Nginx(
            gateway.port,
            directory / "edge",
            worker_processes="1",
            header_timeout=f"{HEADER_TIMEOUT:g}s",
            body_timeout=f"{BODY_TIMEOUT:g}s",
            keepalive_timeout=f"{KEEPALIVE_TIMEOUT:g}s",
            max_connections=str(MAX_REQUESTS),
        )
        try:
            await gateway.start()
            await edge.start()
            async with httpx.AsyncClient() as client:

                async def healthy() -> bool:
                    try:
                        response = await client.get(f"{gateway.url}/health")
                    except httpx.HTTPError:
                        return False
                    return response.status_code == 200

                await eventually(healthy, timeout=20, what="gateway up")
            await edge.wait_ready()
            yield Stack(upstream, gateway, internal_port, edge)
        finally:
            upstream.release.set()
            await edge.stop()
            await gateway.stop()


async def send_raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


def request(*headers: str, path: str = "/api/echo/echo") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: edge.test", *headers, "", ""]
    return "\r\n".join(lines).encode()


def fields(count: int, size: int = 8) -> list[str]:
    return [f"X-Field-{index}: {'v' * size}" for index in range(count)]


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await send_raw(port, data)
    try:
        return await read_until_closed(reader, timeout=10)
    finally:
        writer.close()


async def edge_status(stack: Stack, data: bytes) -> int:
    reader, writer = await send_raw(stack.edge.port, data)
    try:
        status, _ = await read_response(reader)
        return status
    finally:
        writer.close()


async def access_logged(stack: Stack, status: int) -> None:
    """nginx writes its access log line once it has closed the request: wait for it."""

    async def statuses() -> set[int]:
        return {entry["status"] for entry in stack.edge.access_log()}

    await eventually(statuses, until=lambda seen: status in seen, what=f"{status} logged")


async def error_logged(stack: Stack, *parts: str) -> None:
    async def found() -> bool:
        return any(all(part in line for part in parts) for line in stack.edge.lines())

    await eventually(found, what=f"{parts} in the edge's error log")


class TestHeaderLimits:
    async def test_a_header_section_over_16_kib_is_431_at_the_edge(self, stack: Stack) -> None:
        # 17 fields of 1 KiB: none is too long alone, together they are.
        response = await exchange(stack.edge.port, request(*fields(17, 1000)))

        assert status_of(response) == 431
        assert b'"Request header fields too large"' in response
        await access_logged(stack, 431)
        await error_logged(stack, "client sent too long header line")

    async def test_just_over_16_kib_is_431_too(self, stack: Stack) -> None:
        # nginx's buffers are not exact to the byte (its first 1 KiB buffer comes on top); what
        # it lets through over 16 KiB the gateway's own check refuses.
        header_bytes = sum(len(field) + 2 for field in fields(16, 1020))
        assert 16 * 1024 < header_bytes < 17 * 1024

        response = await exchange(stack.edge.port, request(*fields(16, 1020)))

        assert status_of(response) == 431

    async def test_under_16_kib_passes(self, stack: Stack) -> None:
        assert await edge_status(stack, request(*fields(14, 1000))) == 200

    async def test_the_gateway_itself_refuses_a_header_section_over_16_kib(
        self, stack: Stack
    ) -> None:
        # Reached without the edge (from inside). Arriving whole, it passes uvicorn's parser (whose
        # limit is on an unfinished section) and meets the application's check.
        response = await exchange(stack.gateway.port, request(*fields(17, 1000)))

        assert status_of(response) == 431
        assert b"Request header section larger than 16384 bytes" in response
        assert stack.gateway.logged("request refused: header section too large")

    async def test_more_than_100_fields_is_431_and_never_reaches_the_upstream(
        self, stack: Stack
    ) -> None:
        seen = len(stack.upstream.seen)
        before = await stack.gateway_metrics()

        response = await exchange(stack.edge.port, request(*fields(101)))

        assert status_of(response) == 431
        assert b"More than 100 request header fields" in response
        assert len(stack.upstream.seen) == seen
        assert stack.gateway.logged("request refused: header section too large")
        key = (
            "http_server_request_duration_seconds_count",
            frozenset({"method": "GET", "route": "unmatched", "status_code": "431"}.items()),
        )
        after = await stack.gateway_metrics()
        assert after.get(key, 0) == before.get(key, 0) + 1

    async def test_100_fields_pass_with_what_the_edge_adds(self, stack: Stack) -> None:
        # Host is one of the 100; nginx adds X-Forwarded-For and -Proto.
        assert await edge_status(stack, request(*fields(99))) == 200


class TestBodies:
    async def test_a_body_larger_than_nginx_keeps_in_memory_passes(self, stack: Stack) -> None:
        # Over client_body_buffer_size nginx writes the body to its temporary folder, which its
        # workers (another user, when the master is root) must be able to write.
        body = json.dumps({"fill": "x" * 300_000}).encode()
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{stack.edge.port}/api/echo/echo", content=body
            )

        assert response.status_code == 200, response.text
        assert response.json()["bytes"] == len(body)

    async def test_a_body_over_the_limit_is_413(self, stack: Stack) -> None:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{stack.edge.port}/api/echo/echo", content=b"x" * (MiB + 1)
            )

        assert response.status_code == 413


class TestAddresses:
    async def test_the_gateway_sees_the_client_address_never_the_claimed_one(
        self, stack: Stack
    ) -> None:
        reader, writer = await send_raw(
            stack.edge.port, request("X-Forwarded-For: 203.0.113.9", "X-Forwarded-Proto: https")
        )
        try:
            status, body = await read_response(reader)
        finally:
            writer.close()

        assert status == 200
        assert json.loads(body)["x-forwarded-for"] == "127.0.0.1"
        assert stack.upstream.seen[-1]["x-forwarded-proto"] == "http"


class TestMemory:
    async def test_50_unfinished_1_mib_header_sections_leave_memory_bounded(
        self, stack: Stack
    ) -> None:
        edge_pids = stack.edge.pids
        assert stack.gateway.process is not None
        gateway_pid = stack.gateway.process.pid
        before = {pid: rss_kib(pid) for pid in [*edge_pids, gateway_pid]}
        line = b"X-Fill: " + b"a" * 1000 + b"\r\n"
        flood = b"GET / HTTP/1.1\r\nHost: edge.test\r\n" + line * (MiB // len(line))

        async def hold(port: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                try:
                    writer.write(flood)  # never the blank line that ends the headers
                    await writer.drain()
                except ConnectionError:
                    pass
                return await read_until_closed(reader, timeout=10)
            finally:
                writer.close()

        # 50 at the edge and 50 straight at the gateway, at once.
        answers = await asyncio.gather(
            *(hold(stack.edge.port) for _ in range(50)),
            *(hold(stack.gateway.port) for _ in range(50)),
        )
        after = {pid: rss_kib(pid) for pid in before}

        growth_mib = {pid: (after[pid] - before[pid]) / 1024 for pid in before}
        print(f"RSS growth (MiB) by pid, gateway {gateway_pid}: {growth_mib}")
        assert all(growth < 50 for growth in growth_mib.values()), growth_mib
        # Every connection was answered and closed (a reset before the answer counts as closed).
        assert {status_of(answer) for answer in answers[:50]} <= {431, None}
        assert {status_of(answer) for answer in answers[50:]} <= {400, None}


class TestTimeLimits:
    async def closed_after(self, reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
        started = time.monotonic()
        received = await read_until_closed(reader, timeout=limit + 5)
        return time.monotonic() - started, received

    async def test_slow_headers_are_closed(self, stack: Stack) -> None:
        reader, writer = await send_raw(stack.edge.port, b"GET /health HTTP/1.1\r\nHost: e")
        try:
            elapsed, received = await self.closed_after(reader, HEADER_TIMEOUT)
        finally:
            writer.close()

        print(f"slow headers closed after {elapsed:.2f}s")
        assert elapsed >= HEADER_TIMEOUT * 0.9
        assert status_of(received) in (408, None)
        await error_logged(stack, "client timed out", "reading client request headers")

    async def test_a_stalled_body_is_closed(self, stack: Stack) -> None:
        seen = len(stack.upstream.seen)
        head = (
            b"POST /api/echo/echo HTTP/1.1\r\nHost: edge.test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        reader, writer = await send_raw(stack.edge.port, head + b'{"part":')
        try:
            elapsed, received = await self.closed_after(reader, BODY_TIMEOUT)
        finally:
            writer.close()

        print(f"stalled body closed after {elapsed:.2f}s")
        assert elapsed >= BODY_TIMEOUT * 0.9
        assert status_of(received) in (408, None)
        assert len(stack.upstream.seen) == seen  # the edge buffers; nothing went upstream
        await access_logged(stack, 408)

    async def test_a_client_that_aborts_its_body_reaches_nobody(self, stack: Stack) -> None:
        # The edge reads the whole body before it forwards anything: an abort there is nginx's
        # alone (it logs 400 for a body cut short; the gateway never sees the request).
        seen = len(stack.upstream.seen)
        head = (
            b"POST /api/echo/echo HTTP/1.1\r\nHost: edge.test\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        _, writer = await send_raw(stack.edge.port, head + b'{"part":')
        writer.transport.abort()

        await error_logged(stack, "client prematurely closed connection", "POST /api/echo")
        assert len(stack.upstream.seen) == seen

    async def test_an_idle_keep_alive_connection_is_closed(self, stack: Stack) -> None:
        reader, writer = await send_raw(stack.edge.port, request(path="/health"))
        try:
            status, _ = await read_response(reader)
            elapsed, received = await self.closed_after(reader, KEEPALIVE_TIMEOUT)
        finally:
            writer.close()

        print(f"idle keep-alive closed after {elapsed:.2f}s")
        assert status == 200
        assert received == b""
        assert elapsed >= KEEPALIVE_TIMEOUT * 0.9


class TestConcurrency:
    async def test_beyond_the_cap_the_edge_answers_503(self, stack: Stack) -> None:
        held = [
            await send_raw(stack.edge.port, request(path="/api/echo/slow"))
            for _ in range(MAX_REQUESTS)
        ]
        try:
            await eventually(
                lambda: asyncio.sleep(0, stack.upstream.waiting),
                until=lambda waiting: waiting == MAX_REQUESTS,
                what="requests in flight",
            )

            assert await edge_status(stack, request(path="/health")) == 503
            await access_logged(stack, 503)
            await error_logged(stack, "limiting connections by zone")
        finally:
            stack.upstream.release.set()
        for reader, writer in held:
            status, _ = await read_response(reader)
            writer.close()
            assert status == 200
        stack.upstream.release.clear()
        assert await edge_status(stack, request(path="/health")) == 200


def test_the_renderer_fills_every_setting(tmp_path: Path) -> None:
    from tests.support.edge import render_edge_conf

    text = render_edge_conf("127.0.0.1:1", "127.0.0.1:2", tmp_path, tmp_path / "t").read_text()

    assert "${" not in text.split("\n", 3)[3]  # past the comment that names the template
    assert "client_header_timeout 10s;" in text
    assert "client_body_timeout 30s;" in text
    assert "keepalive_timeout 5s;" in text
    assert "large_client_header_buffers 2 8k;" in text
    assert "limit_conn edge_requests 1000;" in text
