"""Fuzzing each service against its own OpenAPI schema (schemathesis): for a bounded number of
generated requests per operation, valid and invalid, no 5xx, and every response matches what
the schema promises (status codes, content type, body)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.processes import ServiceProcess
from tests.support.rabbit import RabbitAdmin, new_vhost_name, vhost_url
from tests.support.users import PASSWORD, new_private_key_pem

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
async def fuzz_vhost(rabbit_admin: RabbitAdmin) -> AsyncIterator[str]:
    """A vhost of this module's own: the campaigns it creates publish events there, never to a
    broker's shared default vhost (where a local worker would take them)."""
    name = new_vhost_name("fuzz")
    await rabbit_admin.create_vhost(name)
    yield name
    await rabbit_admin.delete_vhost(name)


@pytest.fixture(scope="module")
async def services(
    database_url: str, fuzz_vhost: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, str]]:
    logs: Path = tmp_path_factory.mktemp("fuzz")
    env = {"DATABASE_URL": database_url, "RABBITMQ_URL": vhost_url(fuzz_vhost)}
    user = ServiceProcess.web(
        "user_service.main:app", {**env, "JWT_PRIVATE_KEY": new_private_key_pem()}, logs / "u.log"
    )
    campaigns = ServiceProcess.web(
        "campaign_service.main:app",
        {**env, "JWT_JWKS_URL": f"{user.url}/.well-known/jwks.json"},
        logs / "c.log",
    )
    try:
        for process in (user, campaigns):
            await process.start()
            await process.wait_ready()
        credentials = {"tenant_id": "fuzz", "email": "fuzz@example.com", "password": PASSWORD}
        async with httpx.AsyncClient(base_url=user.url) as client:
            await client.post("/register", json=credentials)
            token = (await client.post("/login", json=credentials)).json()["access_token"]
        yield {"user": user.url, "campaigns": campaigns.url, "token": token}
    finally:
        for process in (user, campaigns):
            await process.stop()


def fuzz(schema_url: str, headers: dict[str, str] | None = None, examples: int = 25) -> None:
    """Every operation of the schema, ``examples`` generated requests each (valid and invalid
    ones), each response checked; the first failure fails the test, naming the operation."""
    schema = schemathesis.openapi.from_url(schema_url)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the schema has an invalid operation: {result}"
        operations.append(result.ok())
    assert operations
    for operation in operations:

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            check()
        except Exception as exc:
            raise AssertionError(f"{operation.label}: {exc}") from exc


def test_user_service(services: dict[str, str]) -> None:
    fuzz(f"{services['user']}/openapi.json")


def test_user_service_as_a_tenant_owner(services: dict[str, str]) -> None:
    """The Bearer endpoints (invitations, members) past authentication."""
    fuzz(
        f"{services['user']}/openapi.json",
        headers={"Authorization": f"Bearer {services['token']}"},
    )


def test_campaign_service(services: dict[str, str]) -> None:
    fuzz(
        f"{services['campaigns']}/openapi.json",
        headers={"Authorization": f"Bearer {services['token']}"},
    )


def test_campaign_service_without_a_token(services: dict[str, str]) -> None:
    fuzz(f"{services['campaigns']}/openapi.json", examples=10)
