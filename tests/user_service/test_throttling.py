"""Login throttling: per account (known or not), per client address, and logins being hashed at
once; counted in PostgreSQL, so every replica sees the same counts."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from shared.logs import JsonFormatter
from tests.support.metrics import value
from tests.support.polling import eventually
from tests.support.users import (
    client_of,
    invite_and_register,
    login,
    make_user_settings,
    new_address,
    owner_headers,
    register,
    started,
)
from user_service.app import create_app
from user_service.settings import UserServiceSettings

THROTTLED = {"detail": "Too many failed logins; try again later"}
INCORRECT = {"detail": "Incorrect email or password"}
WRONG = "not the password"
METRIC = "user_logins_throttled_total"


@pytest.fixture
def address() -> str:
    """This test's client address: the address counts of other tests never reach it."""
    return new_address()


@pytest.fixture
async def client(user_app: FastAPI, address: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(user_app, address) as client:
        yield client


@asynccontextmanager
async def service(
    database_url: str, address: str, **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A user_service of the test's own (on the same database), called from ``address``."""
    app = create_app(make_user_settings(database_url, **settings))
    async with started(app), client_of(app, address) as client:
        yield app, client


def retry_after(response: httpx.Response) -> int:
    header = response.headers["retry-after"]
    assert header.isdigit(), header
    return int(header)


async def fail(
    client: httpx.AsyncClient, tenant: str, times: int, email: str = "ada@example.com"
) -> None:
    for _ in range(times):
        response = await login(client, tenant, email, WRONG)
        assert (response.status_code, response.json()) == (401, INCORRECT)


class TestAccountThrottle:
    async def test_the_sixth_attempt_is_refused_even_with_the_right_password(
        self,
        client: httpx.AsyncClient,
        user_settings: UserServiceSettings,
        tenant: str,
        other_tenant: str,
    ) -> None:
        owner = await owner_headers(client, tenant)
        await invite_and_register(client, owner, tenant, "bob@example.com")
        assert (await register(client, other_tenant)).status_code == 201
        await fail(client, tenant, user_settings.login_max_failures)

        response = await login(client, tenant)

        assert response.status_code == 429, response.text
        assert response.json() == THROTTLED
        assert 1 <= retry_after(response) <= user_settings.login_throttle_base_seconds
        # The account is throttled, not its tenant, not its email elsewhere.
        assert (await login(client, tenant, "bob@example.com")).status_code == 200
        assert (await login(client, other_tenant)).status_code == 200

    async def test_an_unknown_email_is_throttled_like_a_known_one(
        self, client: httpx.AsyncClient, tenant: str
    ) -> None:
        assert (await register(client, tenant)).status_code == 201

        async def attempts(email: str) -> list[tuple[int, Any, bool]]:
            responses = [await login(client, tenant, email, WRONG) for _ in range(7)]
            return [(r.status_code, r.json(), "retry-after" in r.headers) for r in responses]

        known = await attempts("ada@example.com")
        unknown = await attempts("nobody@example.com")

        assert known == unknown
        assert known == [(401, INCORRECT, False)] * 5 + [(429, THROTTLED, True)] * 2

    async def test_a_successful_login_clears_the_count(
        self, client: httpx.AsyncClient, tenant: str
    ) -> None:
        assert (await register(client, tenant)).status_code == 201
        await fail(client, tenant, 4)
        assert (await login(client, tenant)).status_code == 200

        await fail(client, tenant, 4)  # nine failures in the window, four since the success

        assert (await login(client, tenant)).status_code == 200

    async def test_concurrent_guesses_get_no_more_checks_than_the_limit(
        self, user_app: FastAPI, tenant: str
    ) -> None:
        """Guesses sent at once (from several addresses, so no per-address limit applies) are
        attempts like any others: at most ``login_max_failures`` of them have the password
        checked, the rest are refused, or a burst buys an attacker more guesses than the limit
        every time a block ends."""
        async with client_of(user_app, new_address()) as client:
            assert (await register(client, tenant)).status_code == 201
        clients = [client_of(user_app, new_address()) for _ in range(12)]
        try:
            responses = await asyncio.gather(
                *(
                    login(client, tenant, password=f"{WRONG} {n}")
                    for n, client in enumerate(clients)
                )
            )
        finally:
            for client in clients:
                await client.aclose()

        statuses = sorted(response.status_code for response in responses)
        assert statuses.count(401) <= 5, statuses
        assert set(statuses) <= {401, 429}, statuses

    async def test_retry_after_doubles_with_each_failure_up_to_the_maximum(
        self, database_url: str, address: str, tenant: str
    ) -> None:
        async with service(
            database_url, address, login_throttle_base_seconds=1, login_throttle_max_seconds=2
        ) as (_, client):
            assert (await register(client, tenant)).status_code == 201
            await fail(client, tenant, 5)
            delays = []
            for attempt in range(3):
                blocked = await login(client, tenant, password=WRONG)
                assert blocked.status_code == 429, blocked.text
                delays.append(retry_after(blocked))
                if attempt < 2:  # once the block ends, the next failure is counted
                    await eventually(
                        lambda: login(client, tenant, password=WRONG),
                        until=lambda response: response.status_code == 401,
                        timeout=10,
                        interval=0.2,
                        what="the block to end",
                    )

        # 1 s after the 5th failure, 2 s after the 6th, 2 s (the maximum) after the 7th.
        assert delays == [1, 2, 2]


class TestAddressThrottle:
    async def test_failures_across_accounts_block_the_address(
        self, database_url: str, address: str, tenant: str
    ) -> None:
        async with service(database_url, address, login_address_max_failures=3) as (app, client):
            assert (await register(client, tenant)).status_code == 201
            for name in ("one", "two", "three"):
                await fail(client, tenant, 1, f"{name}@example.com")

            blocked = await login(client, tenant)  # a fourth account, the right password
            async with client_of(app, new_address()) as elsewhere:
                from_elsewhere = await login(elsewhere, tenant)
            throttled = await value(app, METRIC, scope="address")

        assert (blocked.status_code, blocked.json()) == (429, THROTTLED)
        assert retry_after(blocked) >= 1
        assert from_elsewhere.status_code == 200
        assert throttled == 1

    async def test_too_many_logins_at_once_from_one_address(
        self, database_url: str, address: str, tenant: str
    ) -> None:
        async with service(
            database_url, address, login_max_in_flight_per_address=2, password_hash_threads=1
        ) as (app, client):
            responses = await asyncio.gather(
                *(login(client, tenant, f"user{n}@example.com", WRONG) for n in range(20))
            )
            throttled = await value(app, METRIC, scope="in_flight")

        statuses = [response.status_code for response in responses]
        assert all(status < 500 for status in statuses), statuses
        refused = [response for response in responses if response.status_code == 429]
        assert refused, statuses
        assert all(response.headers["retry-after"] == "1" for response in refused)
        assert {response.status_code for response in responses} == {401, 429}
        assert throttled == len(refused)


class TestSharedCounters:
    async def test_two_replicas_count_together(
        self, database_url: str, address: str, tenant: str
    ) -> None:
        async with (
            service(database_url, address) as (_, first),
            service(database_url, address) as (second_app, second),
        ):
            assert (await register(first, tenant)).status_code == 201
            await fail(first, tenant, 5)

            response = await login(second, tenant)
            throttled = await value(second_app, METRIC, scope="account")

        assert (response.status_code, response.json()) == (429, THROTTLED)
        assert throttled == 1


class TestObservability:
    async def test_throttled_logins_are_counted(
        self, user_app: FastAPI, client: httpx.AsyncClient, tenant: str
    ) -> None:
        assert (await register(client, tenant)).status_code == 201
        await fail(client, tenant, 5)
        before = await value(user_app, METRIC, scope="account")

        statuses = [(await login(client, tenant)).status_code for _ in range(2)]

        assert statuses == [429, 429]
        assert await value(user_app, METRIC, scope="account") == before + 2

    async def test_logged_with_tenant_and_address_never_the_password(
        self,
        client: httpx.AsyncClient,
        address: str,
        tenant: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        secret = f"secret {uuid.uuid4().hex}"
        assert (await register(client, tenant, password=secret)).status_code == 201
        caplog.set_level(logging.DEBUG)
        for _ in range(5):
            assert (await login(client, tenant, password=secret + "x")).status_code == 401

        assert (await login(client, tenant, password=secret)).status_code == 429

        formatter = JsonFormatter("user_service")
        lines = [json.loads(formatter.format(record)) for record in caplog.records]
        throttled = [line for line in lines if line["message"] == "login throttled"]
        assert throttled, [line["message"] for line in lines]
        assert throttled[-1]["tenant_id"] == tenant
        assert throttled[-1]["client_address"] == address
        assert throttled[-1]["scope"] == "account"
        assert secret not in caplog.text
        assert all(secret not in json.dumps(line) for line in lines)


class TestForgetting:
    async def test_counts_idle_past_the_forget_time_go_and_the_others_stay(
        self, database_url: str, address: str, db: asyncpg.Connection
    ) -> None:
        """With an hour to forget and the 15-minute window: only the counts whose window and
        block both ended more than an hour ago go."""
        run = uuid.uuid4().hex
        rows = {  # key: (window started, blocked until)
            "idle": ("3 days", None),
            "block ended long ago": ("3 days", "2 days"),
            "window running": ("0 minutes", None),
            "window ended minutes ago": ("20 minutes", None),
            "block running": ("3 days", "-5 minutes"),
            "block ended minutes ago": ("3 days", "10 minutes"),
        }
        await db.executemany(
            "INSERT INTO login_throttles (key, failures, window_started_at, blocked_until) "
            "VALUES ($1, 4, now() - $2::text::interval, now() - $3::text::interval)",
            [(f"account:{run}:{name}", started, until) for name, (started, until) in rows.items()],
        )

        async def kept() -> set[str]:
            found = await db.fetch(
                "SELECT key FROM login_throttles WHERE key LIKE $1", f"account:{run}:%"
            )
            return {row["key"].rsplit(":", 1)[1] for row in found}

        async with service(
            database_url,
            address,
            login_throttle_forget_seconds=3600,
            housekeeping_interval_seconds=1,
        ):
            remaining = await eventually(
                kept, until=lambda names: "idle" not in names, what="idle counts forgotten"
            )

        assert remaining == {
            "window running",
            "window ended minutes ago",
            "block running",
            "block ended minutes ago",
        }
