"""Attacks on accounts that an attacker's review found, each held: races around sessions and
roles, invitations that outlive their issuer's rights, and the throttle's limits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx

from tests.support.polling import eventually
from tests.support.users import (
    bearer,
    client_of,
    invite,
    invite_and_register,
    logged_in,
    login,
    make_user_settings,
    new_address,
    owner_headers,
    register,
    started,
)
from user_service.app import create_app

REFUSED = {"detail": "Registration in an existing tenant needs a valid invitation for this email"}


@asynccontextmanager
async def holding(database_url: str, statement: str, *args: Any) -> AsyncIterator[None]:
    """Hold the row locks ``statement`` takes, in a transaction of its own, until the block
    ends: what a slow request elsewhere would hold."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(statement, *args)
        yield
    finally:
        await transaction.rollback()
        await connection.close()


async def waiting_for_locks(db: asyncpg.Connection, count: int) -> None:
    """Until ``count`` statements of this database wait for a lock."""

    async def waiting() -> int:
        found: int = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return found

    await eventually(waiting, until=lambda n: n >= count, what=f"{count} waiting for a lock")


class TestSessionRaces:
    async def test_a_refresh_racing_a_revocation_does_not_outlive_it(
        self, user_client: httpx.AsyncClient, tenant: str, database_url: str, db: asyncpg.Connection
    ) -> None:
        await register(user_client, tenant)
        first = await logged_in(user_client, tenant)
        rotated = await user_client.post(
            "/token/refresh", json={"refresh_token": first["refresh_token"]}
        )
        current = rotated.json()["refresh_token"]
        user_id = await db.fetchval("SELECT id FROM users WHERE tenant_id = $1", tenant)

        # A thief refreshes the current token while it is held up; the owner presents the
        # rotated one meanwhile, which revokes the family.
        async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id):
            thief = asyncio.create_task(
                user_client.post("/token/refresh", json={"refresh_token": current})
            )
            await waiting_for_locks(db, 1)
            owner = asyncio.create_task(
                user_client.post("/token/refresh", json={"refresh_token": first["refresh_token"]})
            )
            await waiting_for_locks(db, 2)
        stolen, reused = await thief, await owner

        assert reused.status_code == 401
        assert stolen.status_code == 200  # it got through first ...
        after = await user_client.post(
            "/token/refresh", json={"refresh_token": stolen.json()["refresh_token"]}
        )
        assert after.status_code == 401  # ... and was revoked with its family

    async def test_a_login_racing_the_accounts_removal_is_a_401(
        self, user_client: httpx.AsyncClient, tenant: str, database_url: str, db: asyncpg.Connection
    ) -> None:
        owner = await owner_headers(user_client, tenant)
        member = await invite_and_register(user_client, owner, tenant, "m@example.com")
        remover = await asyncpg.connect(database_url.replace("+asyncpg", ""))
        try:
            removal = remover.transaction()
            await removal.start()
            await remover.execute("DELETE FROM users WHERE id = $1", uuid.UUID(member["id"]))
            attempt = asyncio.create_task(login(user_client, tenant, "m@example.com"))
            await waiting_for_locks(db, 1)  # the login, past the password, waits for the removal
            await removal.commit()
        finally:
            await remover.close()

        response = await attempt
        assert response.status_code == 401, response.text


class TestRightsThatLapse:
    async def test_a_removed_admins_invitations_lapse(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        owner = await owner_headers(user_client, tenant)
        admin = await invite_and_register(
            user_client, owner, tenant, "mallory@example.com", "admin"
        )
        mallory = bearer(
            (await logged_in(user_client, tenant, "mallory@example.com"))["access_token"]
        )
        spare = await invite(user_client, mallory, "mallory2@example.com", "admin")

        removed = await user_client.delete(f"/members/{admin['id']}", headers=owner)
        back = await register(
            user_client, tenant, "mallory2@example.com", invitation=spare["token"]
        )
        listed = await user_client.get("/invitations", headers=owner)

        assert removed.status_code == 204
        assert (back.status_code, back.json()) == (403, REFUSED)
        assert spare["id"] not in [invitation["id"] for invitation in listed.json()]

    async def test_a_demoted_admins_invitations_lapse(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        owner = await owner_headers(user_client, tenant)
        admin = await invite_and_register(user_client, owner, tenant, "eve@example.com", "admin")
        eve = bearer((await logged_in(user_client, tenant, "eve@example.com"))["access_token"])
        spare = await invite(user_client, eve, "eve2@example.com", "admin")

        demoted = await user_client.patch(
            f"/members/{admin['id']}", json={"role": "member"}, headers=owner
        )
        back = await register(user_client, tenant, "eve2@example.com", invitation=spare["token"])

        assert demoted.status_code == 200
        assert (back.status_code, back.json()) == (403, REFUSED)

    async def test_an_owner_demoted_while_waiting_cannot_make_owners(
        self, user_client: httpx.AsyncClient, tenant: str, database_url: str, db: asyncpg.Connection
    ) -> None:
        first = await owner_headers(user_client, tenant)
        second = await invite_and_register(user_client, first, tenant, "b@example.com", "admin")
        await user_client.patch(f"/members/{second['id']}", json={"role": "owner"}, headers=first)
        member = await invite_and_register(user_client, first, tenant, "x@example.com")
        as_second = bearer((await logged_in(user_client, tenant, "b@example.com"))["access_token"])

        # The second owner's request waits for the tenant while the first demotes them.
        async with holding(database_url, "SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant):
            promote = asyncio.create_task(
                user_client.patch(
                    f"/members/{member['id']}", json={"role": "owner"}, headers=as_second
                )
            )
            await waiting_for_locks(db, 1)
            await db.execute(
                "UPDATE users SET role = 'member' WHERE id = $1", uuid.UUID(second["id"])
            )
        response = await promote

        assert response.status_code == 403
        roles = dict(await db.fetch("SELECT email, role FROM users WHERE tenant_id = $1", tenant))
        assert roles == {
            "ada@example.com": "owner",
            "b@example.com": "member",
            "x@example.com": "member",
        }


class TestThrottleLimits:
    async def test_a_new_window_keeps_a_running_block(
        self, user_client: httpx.AsyncClient, tenant: str, db: asyncpg.Connection
    ) -> None:
        await register(user_client, tenant)
        codes = [
            (await login(user_client, tenant, password="wrong password")).status_code
            for _ in range(6)
        ]
        # The window of those failures ends while the block still runs.
        await db.execute(
            "UPDATE login_throttles SET window_started_at = now() - interval '1 day' "
            "WHERE key = $1",
            f"account:{tenant}:ada@example.com",
        )
        after = await login(user_client, tenant)

        assert codes == [401] * 5 + [429]
        assert after.status_code == 429
        assert int(after.headers["retry-after"]) > 1

    async def test_registrations_from_one_address_are_limited(self, database_url: str) -> None:
        app = create_app(make_user_settings(database_url, login_address_max_failures=3))
        async with started(app), client_of(app, new_address()) as caller:
            responses = [await register(caller, f"t-{uuid.uuid4().hex[:12]}") for _ in range(5)]

        assert [r.status_code for r in responses] == [201, 201, 201, 429, 429]
        assert responses[-1].json() == {
            "detail": "Too many registrations from this address; try again later"
        }
        assert int(responses[-1].headers["retry-after"]) > 1
