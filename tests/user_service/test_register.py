from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.support.bodies import NOT_JSON
from tests.support.users import clients_from_new_addresses, invite, owner_headers
from user_service.users.schemas import PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH

PASSWORD = "correct horse battery staple"


def body(tenant: str, email: str = "ada@example.com", password: str = PASSWORD) -> dict[str, str]:
    return {"tenant_id": tenant, "email": email, "password": password}


async def register_with(
    client: httpx.AsyncClient, tenant: str, email: str, invitation: str
) -> httpx.Response:
    return await client.post("/register", json={**body(tenant, email), "invitation": invitation})


def failing_fields(response: httpx.Response) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    return [error["loc"] for error in response.json()["detail"]]


class TestRegister:
    async def test_creates_the_user(
        self, user_client: httpx.AsyncClient, tenant: str, db: asyncpg.Connection
    ) -> None:
        response = await user_client.post("/register", json=body(tenant, "Ada@Example.COM"))

        assert response.status_code == 201, response.text
        user = response.json()
        assert set(user) == {"id", "tenant_id", "email", "role", "created_at"}
        assert user["tenant_id"] == tenant
        assert user["email"] == "ada@example.com"
        assert user["role"] == "owner"  # the first user of a tenant creates and owns it
        created_at = datetime.fromisoformat(user["created_at"])
        assert abs(datetime.now(UTC) - created_at) < timedelta(minutes=1)
        row = await db.fetchrow("SELECT * FROM users WHERE id = $1", uuid.UUID(user["id"]))
        assert row is not None
        assert row["tenant_id"] == tenant
        assert row["hashed_password"].startswith("$argon2id$")
        assert PASSWORD not in row["hashed_password"]

    async def test_committed_before_the_response(
        self, user_app: FastAPI, tenant: str, db: asyncpg.Connection
    ) -> None:
        # Straight ASGI: look at the database the moment the response starts. (httpx's ASGI
        # transport returns only once the whole call has ended, after any late commit.)
        payload = json.dumps(body(tenant)).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/register",
            "raw_path": b"/register",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"user-service"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        seen: dict[str, int] = {}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": payload, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                # Another connection, while the response is only starting.
                seen["rows"] = await db.fetchval(
                    "SELECT count(*) FROM users WHERE tenant_id = $1", tenant
                )

        await user_app(scope, receive, send)

        assert seen == {"status": 201, "rows": 1}

    async def test_same_email_twice_in_a_tenant_is_a_conflict(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        """Only through invitations (without one, an existing tenant refuses everyone): two
        invitations for one email, the second used after the first."""
        owner = await owner_headers(user_client, tenant)
        first, second, third = [await invite(user_client, owner, "bob@example.com") for _ in "123"]

        joined = await register_with(user_client, tenant, "bob@example.com", first["token"])
        again = await register_with(user_client, tenant, "bob@example.com", second["token"])
        other_case = await register_with(user_client, tenant, "BOB@example.com", third["token"])

        assert joined.status_code == 201
        assert again.status_code == 409
        assert other_case.status_code == 409
        assert again.json() == {"detail": "This email is already registered in this tenant"}

    async def test_same_email_in_two_tenants(
        self, user_client: httpx.AsyncClient, tenant: str, other_tenant: str
    ) -> None:
        first = await user_client.post("/register", json=body(tenant))
        second = await user_client.post("/register", json=body(other_tenant))

        assert (first.status_code, second.status_code) == (201, 201)
        assert first.json()["id"] != second.json()["id"]

    async def test_racing_registrations_create_one_user(
        self, user_app: FastAPI, tenant: str, db: asyncpg.Connection
    ) -> None:
        emails = ["race@example.com", "RACE@example.com", "Race@Example.com"] * 4

        async with clients_from_new_addresses(user_app, len(emails)) as clients:
            responses = await asyncio.gather(
                *(
                    client.post("/register", json=body(tenant, email))
                    for client, email in zip(clients, emails, strict=True)
                )
            )

        # The first creates the tenant; the others find it existing, and have no invitation.
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [201] + [403] * (len(emails) - 1)
        count = await db.fetchval("SELECT count(*) FROM users WHERE tenant_id = $1", tenant)
        assert count == 1

    async def test_racing_registrations_with_invitations_create_one_user(
        self,
        user_client: httpx.AsyncClient,
        user_app: FastAPI,
        tenant: str,
        db: asyncpg.Connection,
    ) -> None:
        owner = await owner_headers(user_client, tenant)
        invitations = [await invite(user_client, owner, "race@example.com") for _ in range(6)]

        async with clients_from_new_addresses(user_app, len(invitations)) as clients:
            responses = await asyncio.gather(
                *(
                    register_with(client, tenant, "Race@Example.com", invitation["token"])
                    for client, invitation in zip(clients, invitations, strict=True)
                )
            )

        statuses = sorted(response.status_code for response in responses)
        assert statuses == [201] + [409] * (len(invitations) - 1)
        count = await db.fetchval(
            "SELECT count(*) FROM users WHERE tenant_id = $1 AND email = $2",
            tenant,
            "race@example.com",
        )
        assert count == 1


class TestRegisterValidation:
    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"email": "not-an-email"}, "email"),
            ({"email": "ada@"}, "email"),
            ({"email": ""}, "email"),
            ({"tenant_id": ""}, "tenant_id"),
            ({"tenant_id": "Acme"}, "tenant_id"),
            ({"tenant_id": "acme_corp"}, "tenant_id"),
            ({"tenant_id": "-acme"}, "tenant_id"),
            ({"tenant_id": "a" * 64}, "tenant_id"),
            ({"tenant_id": 42}, "tenant_id"),
            ({"password": "x" * (PASSWORD_MIN_LENGTH - 1)}, "password"),
            ({"password": "x" * (PASSWORD_MAX_LENGTH + 1)}, "password"),
            ({"is_admin": True}, "is_admin"),
        ],
    )
    async def test_names_the_invalid_field(
        self, user_client: httpx.AsyncClient, tenant: str, change: dict[str, Any], field: str
    ) -> None:
        response = await user_client.post("/register", json={**body(tenant), **change})

        assert ["body", field] in failing_fields(response)

    @pytest.mark.parametrize("missing", ["tenant_id", "email", "password"])
    async def test_names_a_missing_field(
        self, user_client: httpx.AsyncClient, tenant: str, missing: str
    ) -> None:
        payload = body(tenant)
        del payload[missing]

        response = await user_client.post("/register", json=payload)

        assert ["body", missing] in failing_fields(response)

    async def test_longest_allowed_values_are_accepted(
        self, user_client: httpx.AsyncClient
    ) -> None:
        tenant = "a" + uuid.uuid4().hex + "b" * 30  # 63 characters
        response = await user_client.post(
            "/register", json=body(tenant, password="p" * PASSWORD_MAX_LENGTH)
        )

        assert response.status_code == 201, response.text

    async def test_rejected_password_is_not_echoed(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        response = await user_client.post("/register", json=body(tenant, password="short1"))

        assert response.status_code == 422
        assert "short1" not in response.text

    @pytest.mark.parametrize("content", NOT_JSON)
    async def test_non_json_body(self, user_client: httpx.AsyncClient, content: bytes) -> None:
        response = await user_client.post(
            "/register", content=content, headers={"content-type": "application/json"}
        )

        assert response.status_code == 422
        assert failing_fields(response)[0][0] == "body"

    async def test_oversized_body_with_declared_length(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        payload = {**body(tenant), "padding": "x" * 100_000}

        response = await user_client.post("/register", json=payload)

        assert failing_fields(response) == [["body"]]
        assert response.json()["detail"][0]["type"] == "body_too_large"

    async def test_oversized_chunked_body(self, user_client: httpx.AsyncClient) -> None:
        async def chunks() -> Any:
            for _ in range(100):
                yield b"x" * 1024

        response = await user_client.post(
            "/register", content=chunks(), headers={"content-type": "application/json"}
        )

        assert failing_fields(response) == [["body"]]
