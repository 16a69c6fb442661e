"""Registration into tenants: the first user of a tenant owns it, everyone after joins by an
invitation issued for their email, and every refusal looks the same."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.support.users import (
    clients_from_new_addresses,
    headers_for,
    invite,
    invite_and_register,
    logged_in,
    login,
    owner_headers,
    register,
    token_claims,
)

REFUSED = {"detail": "Registration in an existing tenant needs a valid invitation for this email"}
BOB = "bob@example.com"


def fullwidth(text: str) -> str:
    """ASCII ``text`` in its fullwidth look-alike letters (U+FF01 to U+FF5E)."""
    return "".join(chr(ord(char) + 0xFEE0) for char in text)


@dataclass
class Setting:
    """A tenant with its owner, another tenant with its own, and the database to age rows."""

    client: httpx.AsyncClient
    tenant: str
    owner: dict[str, str]
    other_tenant: str
    other_owner: dict[str, str]
    db: asyncpg.Connection


@pytest.fixture
async def setting(
    user_client: httpx.AsyncClient, tenant: str, other_tenant: str, db: asyncpg.Connection
) -> Setting:
    return Setting(
        client=user_client,
        tenant=tenant,
        owner=await owner_headers(user_client, tenant),
        other_tenant=other_tenant,
        other_owner=await owner_headers(user_client, other_tenant),
        db=db,
    )


async def members_of(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, str]:
    response = await client.get("/members", headers=headers)
    assert response.status_code == 200, response.text
    return {member["email"]: member["role"] for member in response.json()}


class TestNewTenant:
    async def test_first_registration_creates_the_tenant_with_its_owner(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        response = await register(user_client, tenant)

        assert response.status_code == 201, response.text
        user = response.json()
        assert set(user) == {"id", "tenant_id", "email", "role", "created_at"}
        assert (user["tenant_id"], user["email"], user["role"]) == (
            tenant,
            "ada@example.com",
            "owner",
        )
        headers = await headers_for(user_client, tenant)
        assert await members_of(user_client, headers) == {"ada@example.com": "owner"}

    async def test_an_invitation_cannot_create_a_tenant(self, setting: Setting) -> None:
        invitation = await invite(setting.client, setting.owner, BOB)
        new_tenant = f"n-{uuid.uuid4().hex[:12]}"

        refused = await register(setting.client, new_tenant, BOB, invitation=invitation["token"])
        garbage = await register(setting.client, new_tenant, BOB, invitation="garbage")
        created = await register(setting.client, new_tenant, BOB)

        assert (refused.status_code, garbage.status_code) == (403, 403)
        assert created.status_code == 201  # the refusals created nothing
        assert created.json()["role"] == "owner"
        # Refused there, the invitation is still good where it was issued.
        joined = await register(setting.client, setting.tenant, BOB, invitation=invitation["token"])
        assert joined.status_code == 201, joined.text

    async def test_two_racing_registrations_make_one_owner(
        self, user_client: httpx.AsyncClient, user_app: FastAPI
    ) -> None:
        tenants = [f"r-{uuid.uuid4().hex[:12]}" for _ in range(3)]
        attempts = [(tenant, email) for tenant in tenants for email in ("ada@example.com", BOB)]

        async with clients_from_new_addresses(user_app, len(attempts)) as clients:
            responses = await asyncio.gather(
                *(
                    register(client, tenant, email)
                    for client, (tenant, email) in zip(clients, attempts, strict=True)
                )
            )

        for index, tenant in enumerate(tenants):
            pair = responses[2 * index : 2 * index + 2]
            assert sorted(r.status_code for r in pair) == [201, 403], [r.text for r in pair]
            [winner] = [r.json() for r in pair if r.status_code == 201]
            [loser] = [r.json() for r in pair if r.status_code == 403]
            assert winner["role"] == "owner"
            assert loser == REFUSED
            headers = await headers_for(user_client, tenant, winner["email"])
            assert await members_of(user_client, headers) == {winner["email"]: "owner"}


async def no_invitation(s: Setting) -> str | None:
    return None


async def garbage(s: Setting) -> str | None:
    return "not-an-invitation-token"


async def expired(s: Setting) -> str | None:
    invitation = await invite(s.client, s.owner, BOB)
    await s.db.execute(
        "UPDATE invitations SET expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(invitation["id"]),
    )
    token: str = invitation["token"]
    return token


async def revoked(s: Setting) -> str | None:
    invitation = await invite(s.client, s.owner, BOB)
    response = await s.client.delete(f"/invitations/{invitation['id']}", headers=s.owner)
    assert response.status_code == 204, response.text
    token: str = invitation["token"]
    return token


async def used(s: Setting) -> str | None:
    """Used by bob, who was removed since: the invitation does not let him back in."""
    invitation = await invite(s.client, s.owner, BOB)
    joined = await register(s.client, s.tenant, BOB, invitation=invitation["token"])
    assert joined.status_code == 201, joined.text
    removed = await s.client.delete(f"/members/{joined.json()['id']}", headers=s.owner)
    assert removed.status_code == 204, removed.text
    token: str = invitation["token"]
    return token


async def for_another_email(s: Setting) -> str | None:
    token: str = (await invite(s.client, s.owner, "carol@example.com"))["token"]
    return token


async def from_another_tenant(s: Setting) -> str | None:
    token: str = (await invite(s.client, s.other_owner, BOB))["token"]
    return token


REFUSALS: list[Callable[[Setting], Awaitable[str | None]]] = [
    no_invitation,
    garbage,
    expired,
    revoked,
    used,
    for_another_email,
    from_another_tenant,
]


class TestJoiningAnExistingTenant:
    @pytest.mark.parametrize("invitation", REFUSALS, ids=lambda make: make.__name__)
    async def test_refused_with_one_body_for_every_reason(
        self, setting: Setting, invitation: Callable[[Setting], Awaitable[str | None]]
    ) -> None:
        token = await invitation(setting)

        response = await register(setting.client, setting.tenant, BOB, invitation=token)

        assert response.status_code == 403, response.text
        assert response.json() == REFUSED
        assert (await login(setting.client, setting.tenant, BOB)).status_code == 401
        assert BOB not in await members_of(setting.client, setting.owner)

    async def test_an_explicit_null_invitation_is_no_invitation(self, setting: Setting) -> None:
        body = {"tenant_id": setting.tenant, "email": BOB, "password": "p" * 12, "invitation": None}

        response = await setting.client.post("/register", json=body)

        assert (response.status_code, response.json()) == (403, REFUSED)

    @pytest.mark.parametrize("role", ["member", "admin"])
    async def test_a_valid_invitation_grants_its_role_once(
        self, setting: Setting, role: str
    ) -> None:
        invitation = await invite(setting.client, setting.owner, BOB, role)

        joined = await register(setting.client, setting.tenant, BOB, invitation=invitation["token"])
        again = await register(setting.client, setting.tenant, BOB, invitation=invitation["token"])

        assert joined.status_code == 201, joined.text
        user = joined.json()
        assert (user["tenant_id"], user["email"], user["role"]) == (setting.tenant, BOB, role)
        assert (again.status_code, again.json()) == (403, REFUSED)
        assert await members_of(setting.client, setting.owner) == {
            "ada@example.com": "owner",
            BOB: role,
        }
        pending = await setting.client.get("/invitations", headers=setting.owner)
        assert invitation["id"] not in [item["id"] for item in pending.json()]
        tokens = await logged_in(setting.client, setting.tenant, BOB)
        assert token_claims(tokens["access_token"])["role"] == role

    async def test_a_second_invitation_for_an_account_that_exists_is_a_conflict(
        self, setting: Setting
    ) -> None:
        first = await invite(setting.client, setting.owner, BOB)
        second = await invite(setting.client, setting.owner, BOB)
        joined = await register(setting.client, setting.tenant, BOB, invitation=first["token"])
        assert joined.status_code == 201, joined.text

        response = await register(setting.client, setting.tenant, BOB, invitation=second["token"])

        assert response.status_code == 409, response.text


class TestEmailNormalisation:
    async def test_look_alike_forms_are_one_account(self, setting: Setting) -> None:
        first = await invite(setting.client, setting.owner, fullwidth("BOB") + "@Example.com")
        second = await invite(setting.client, setting.owner, BOB)

        joined = await register(
            setting.client, setting.tenant, "Bob@EXAMPLE.com", invitation=first["token"]
        )
        again = await register(
            setting.client,
            setting.tenant,
            fullwidth("bob") + "@example.com",
            invitation=second["token"],
        )

        assert joined.status_code == 201, joined.text
        assert joined.json()["email"] == BOB
        assert again.status_code == 409, again.text
        for form in (fullwidth("bob") + "@example.com", "BOB@example.com", BOB):
            tokens = await logged_in(setting.client, setting.tenant, form)
            assert token_claims(tokens["access_token"])["sub"] == joined.json()["id"]

    async def test_an_invitation_for_a_member_in_another_form_is_a_conflict(
        self, setting: Setting
    ) -> None:
        response = await setting.client.post(
            "/invitations",
            json={"email": fullwidth("ADA") + "@example.COM", "role": "member"},
            headers=setting.owner,
        )

        assert response.status_code == 409, response.text


class TestRoleClaim:
    async def test_the_access_token_carries_the_role_of_each_user(self, setting: Setting) -> None:
        users: dict[str, Any] = {"owner": "ada@example.com"}
        for role in ("admin", "member"):
            email = f"{role}@example.com"
            await invite_and_register(setting.client, setting.owner, setting.tenant, email, role)
            users[role] = email

        for role, email in users.items():
            tokens = await logged_in(setting.client, setting.tenant, email)
            claims = token_claims(tokens["access_token"])
            assert claims["role"] == role
            assert claims["tenant_id"] == setting.tenant
