"""The service as an operator sees it: health, readiness, docs, JSON logs."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from shared.logs import JsonFormatter


class TestHealth:
    async def test_health_and_ready(self, user_client: httpx.AsyncClient) -> None:
        health = await user_client.get("/health")
        ready = await user_client.get("/ready")

        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"database": "ok"}}

    async def test_not_ready_without_its_database_but_alive(self, start_user_service: Any) -> None:
        # Port 9 (discard) has nothing listening: the database is unreachable.
        async with start_user_service(
            database_url="postgresql+asyncpg://postgres@127.0.0.1:9/none",
            readiness_timeout_seconds=1.0,
        ) as service:
            ready = await service.get("/ready")
            health = await service.get("/health")

        assert ready.status_code == 503
        assert ready.json() == {"status": "not ready", "checks": {"database": "unreachable"}}
        assert health.status_code == 200

    async def test_docs_and_schema(self, user_client: httpx.AsyncClient) -> None:
        docs = await user_client.get("/docs")
        schema = (await user_client.get("/openapi.json")).json()

        assert docs.status_code == 200
        assert {
            "/register",
            "/login",
            "/token/refresh",
            "/logout",
            "/invitations",
            "/members",
            "/members/{member_id}",
            "/.well-known/jwks.json",
            "/health",
            "/ready",
        } <= set(schema["paths"])


class TestJsonLogs:
    def test_one_json_object_per_line_with_extras(self) -> None:
        formatter = JsonFormatter("user_service")
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
        record.tenant_id = "acme"

        line = json.loads(formatter.format(record))

        assert line["message"] == "hello you"
        assert line["level"] == "INFO"
        assert line["service"] == "user_service"
        assert line["tenant_id"] == "acme"
        assert "timestamp" in line


@pytest.mark.parametrize("path", ["/register", "/login"])
async def test_get_is_not_allowed(user_client: httpx.AsyncClient, path: str) -> None:
    assert (await user_client.get(path)).status_code == 405
