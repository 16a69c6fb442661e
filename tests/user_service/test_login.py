from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import asyncpg
import bcrypt
import httpx
import pytest
from fastapi import FastAPI
from joserfc import jws
from pwdlib.hashers.argon2 import Argon2Hasher

from shared.tokens import JWKSKeys, TokenVerifier
from tests.support.users import USER_SERVICE_URL
from user_service.settings import UserServiceSettings

PASSWORD = "correct horse battery staple"


async def register(client: httpx.AsyncClient, tenant: str, email: str = "ada@example.com") -> Any:
    response = await client.post(
        "/register", json={"tenant_id": tenant, "email": email, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def login(
    client: httpx.AsyncClient, tenant: str, email: str = "ada@example.com", password: str = PASSWORD
) -> httpx.Response:
    return await client.post(
        "/login", json={"tenant_id": tenant, "email": email, "password": password}
    )


def verifier_for(client: httpx.AsyncClient, settings: UserServiceSettings) -> TokenVerifier:
    keys = JWKSKeys(f"{USER_SERVICE_URL}/.well-known/jwks.json", client)
    return TokenVerifier(keys=keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience)


class TestLogin:
    async def test_returns_a_token_that_verifies_against_the_jwks(
        self, user_client: httpx.AsyncClient, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        user = await register(user_client, tenant)

        response = await login(user_client, tenant, "ADA@example.com")

        assert response.status_code == 200, response.text
        token = response.json()
        assert token["token_type"] == "bearer"
        assert token["expires_in"] == user_settings.jwt_access_token_ttl_seconds
        principal = await verifier_for(user_client, user_settings).verify(token["access_token"])
        assert principal.user_id == uuid.UUID(user["id"])
        assert principal.tenant_id == tenant

    async def test_token_carries_the_documented_claims(
        self, user_client: httpx.AsyncClient, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        user = await register(user_client, tenant)
        access_token = (await login(user_client, tenant)).json()["access_token"]

        compact = jws.extract_compact(access_token.encode())
        claims = json.loads(compact.payload)
        header = compact.headers()
        jwks = (await user_client.get("/.well-known/jwks.json")).json()
        assert header["alg"] == "Ed25519"
        assert header["kid"] in {key["kid"] for key in jwks["keys"]}
        assert set(claims) == {"sub", "tenant_id", "role", "iss", "aud", "iat", "exp", "jti"}
        assert claims["sub"] == user["id"]
        assert claims["role"] == "owner"
        assert claims["iss"] == user_settings.jwt_issuer
        assert claims["aud"] == user_settings.jwt_audience
        assert claims["exp"] - claims["iat"] == user_settings.jwt_access_token_ttl_seconds

    async def test_each_login_gets_its_own_token_id(
        self, user_client: httpx.AsyncClient, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        await register(user_client, tenant)
        verifier = verifier_for(user_client, user_settings)

        first = await verifier.verify((await login(user_client, tenant)).json()["access_token"])
        second = await verifier.verify((await login(user_client, tenant)).json()["access_token"])

        assert first.token_id != second.token_id

    async def test_wrong_password_and_unknown_email_get_the_same_answer(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        await register(user_client, tenant)

        wrong_password = await login(user_client, tenant, password="not the password")
        unknown_email = await login(user_client, tenant, email="nobody@example.com")
        other_tenant = await login(user_client, f"{tenant}-x")

        for response in (wrong_password, unknown_email, other_tenant):
            assert response.status_code == 401
            assert response.json() == {"detail": "Incorrect email or password"}
            assert response.headers["www-authenticate"] == "Bearer"

    async def test_wrong_password_and_unknown_email_take_about_the_same_time(
        self, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        await register(user_client, tenant)

        async def median_seconds(**kwargs: str) -> float:
            durations = []
            for _ in range(5):
                started = time.perf_counter()
                response = await login(user_client, tenant, **kwargs)
                durations.append(time.perf_counter() - started)
                assert response.status_code == 401
            return statistics.median(durations)

        wrong_password = await median_seconds(password="not the password")
        unknown_email = await median_seconds(email="nobody@example.com")

        # Both verify an argon2id hash; skipping it would make one side many times faster.
        assert 0.5 < unknown_email / wrong_password < 2.0

    async def test_bcrypt_hash_is_verified_and_upgraded(
        self,
        user_client: httpx.AsyncClient,
        user_settings: UserServiceSettings,
        tenant: str,
        db: asyncpg.Connection,
    ) -> None:
        user = await register(user_client, tenant)
        legacy = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        await db.execute(
            "UPDATE users SET hashed_password = $1 WHERE id = $2", legacy, uuid.UUID(user["id"])
        )

        response = await login(user_client, tenant)

        assert response.status_code == 200
        stored = await db.fetchval(
            "SELECT hashed_password FROM users WHERE id = $1", uuid.UUID(user["id"])
        )
        assert stored.startswith("$argon2id$")
        assert (await login(user_client, tenant)).status_code == 200
        assert (await login(user_client, tenant, password="wrong password")).status_code == 401

    async def test_argon2_hash_with_other_parameters_is_rehashed_at_the_current_ones(
        self, user_client: httpx.AsyncClient, tenant: str, db: asyncpg.Connection
    ) -> None:
        user = await register(user_client, tenant)
        current = await db.fetchval(
            "SELECT hashed_password FROM users WHERE id = $1", uuid.UUID(user["id"])
        )
        older = Argon2Hasher(memory_cost=8 * 1024, time_cost=3, parallelism=1).hash(PASSWORD)
        await db.execute(
            "UPDATE users SET hashed_password = $1 WHERE id = $2", older, uuid.UUID(user["id"])
        )

        assert (await login(user_client, tenant)).status_code == 200

        stored = await db.fetchval(
            "SELECT hashed_password FROM users WHERE id = $1", uuid.UUID(user["id"])
        )
        # "$argon2id$v=19$m=...,t=...,p=...$salt$hash": the parameters are the current ones.
        assert stored.split("$")[3] == current.split("$")[3] != older.split("$")[3]
        assert (await login(user_client, tenant)).status_code == 200

    @pytest.mark.parametrize("stored", ["", "plaintext-password", "$md5$abc", "$argon2id$broken"])
    async def test_a_stored_hash_in_no_known_format_refuses_the_login(
        self,
        user_client: httpx.AsyncClient,
        tenant: str,
        db: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture,
        stored: str,
    ) -> None:
        user = await register(user_client, tenant)
        await db.execute(
            "UPDATE users SET hashed_password = $1 WHERE id = $2", stored, uuid.UUID(user["id"])
        )

        response = await login(user_client, tenant)

        assert response.status_code == 401
        assert response.json() == (await login(user_client, tenant, password="wrong")).json()
        assert any(
            record.levelname == "ERROR" and getattr(record, "user_id", None) == user["id"]
            for record in caplog.records
        )

    async def test_overlong_password_against_a_bcrypt_hash_is_refused(
        self, user_client: httpx.AsyncClient, tenant: str, db: asyncpg.Connection
    ) -> None:
        user = await register(user_client, tenant)
        legacy = bcrypt.hashpw(b"p" * 72, bcrypt.gensalt(rounds=4)).decode()
        await db.execute(
            "UPDATE users SET hashed_password = $1 WHERE id = $2", legacy, uuid.UUID(user["id"])
        )

        response = await login(user_client, tenant, password="p" * 100)

        assert response.status_code == 401

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"tenant_id": ""}, "tenant_id"),
            ({"email": "nope"}, "email"),
            ({"password": ""}, "password"),
            ({"password": "p" * 129}, "password"),
        ],
    )
    async def test_invalid_input(
        self, user_client: httpx.AsyncClient, tenant: str, change: dict[str, str], field: str
    ) -> None:
        payload = {"tenant_id": tenant, "email": "ada@example.com", "password": PASSWORD, **change}

        response = await user_client.post("/login", json=payload)

        assert response.status_code == 422
        assert ["body", field] in [error["loc"] for error in response.json()["detail"]]


class TestPasswordHashingOffTheEventLoop:
    async def test_hashing_and_verifying_run_in_worker_threads(
        self, user_app: FastAPI, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        hasher = user_app.state.passwords._hash
        seen: list[str] = []
        original_hash, original_verify = hasher.hash, hasher.verify_and_update

        def record_hash(*args: Any, **kwargs: Any) -> Any:
            seen.append(threading.current_thread().name)
            return original_hash(*args, **kwargs)

        def record_verify(*args: Any, **kwargs: Any) -> Any:
            seen.append(threading.current_thread().name)
            return original_verify(*args, **kwargs)

        hasher.hash, hasher.verify_and_update = record_hash, record_verify
        try:
            await register(user_client, tenant)
            await login(user_client, tenant)
        finally:
            del hasher.hash, hasher.verify_and_update

        assert len(seen) == 2
        assert threading.main_thread().name not in seen
        assert all(name.startswith("password") for name in seen)

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities: Linux")
    async def test_hashing_threads_yield_the_cpu_to_the_event_loop(
        self, user_app: FastAPI, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        hasher = user_app.state.passwords._hash
        priorities: list[int] = []
        original_hash = hasher.hash

        def record_hash(*args: Any, **kwargs: Any) -> Any:
            priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return original_hash(*args, **kwargs)

        hasher.hash = record_hash
        try:
            await register(user_client, tenant)
        finally:
            del hasher.hash

        loop_priority = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert priorities == [min(loop_priority + 10, 19)]


class TestLoginUnderLoad:
    async def test_no_connection_is_held_while_the_password_is_checked(
        self, user_app: FastAPI, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        await register(user_client, tenant)
        hasher = user_app.state.passwords
        checking = asyncio.Event()
        release = asyncio.Event()
        original = hasher.verify_and_update

        async def slow_verify(*args: Any) -> Any:
            checking.set()
            await release.wait()
            return await original(*args)

        hasher.verify_and_update = slow_verify
        try:
            login_task = asyncio.create_task(login(user_client, tenant))
            await asyncio.wait_for(checking.wait(), timeout=5)
            held = user_app.state.engine.pool.checkedout()
            release.set()
            response = await login_task
        finally:
            del hasher.verify_and_update

        assert held == 0
        assert response.status_code == 200

    async def test_too_many_waiting_hashes_get_a_503(self, database_url: str, tenant: str) -> None:
        from tests.support.apps import running
        from tests.support.users import USER_SERVICE_URL, make_user_settings
        from user_service.app import create_app

        settings = make_user_settings(
            database_url, password_hash_threads=1, password_hash_queue_limit=0
        )
        async with running(create_app(settings), USER_SERVICE_URL) as client:
            await register(client, tenant)
            responses = await asyncio.gather(*(login(client, tenant) for _ in range(6)))

        statuses = sorted(response.status_code for response in responses)
        assert 200 in statuses
        assert 503 in statuses
        busy = next(response for response in responses if response.status_code == 503)
        assert busy.headers["retry-after"]
        assert "try again" in busy.json()["detail"]
