from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import shared.models  # noqa: F401
from shared.db import Base
from shared.migrate import migrate
from tests.conftest import ADMIN_DATABASE_URL
from tests.support.databases import create_database, drop_database


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


class TestMigrations:
    async def test_migrated_schema_matches_the_models(self, db_engine: AsyncEngine) -> None:
        async with db_engine.connect() as connection:
            diff = await connection.run_sync(_diff)

        assert diff == []

    async def test_migrating_again_changes_nothing(
        self, database_url: str, db_engine: AsyncEngine
    ) -> None:
        await migrate(database_url)

        async with db_engine.connect() as connection:
            assert await connection.run_sync(_diff) == []


USERS_AT_0002 = [
    # (tenant, email, created_at offset in minutes): the earliest of each tenant owns it.
    ("acme", "second@example.com", 5),
    ("acme", "first@example.com", 1),
    ("acme", "third@example.com", 9),
    ("globex", "late@example.com", 30),
    ("globex", "early@example.com", 2),
]


@asynccontextmanager
async def database_at(run_id: str, revision: str) -> AsyncIterator[str]:
    """A database of the test's own, migrated up to ``revision`` only."""
    name = f"campaigns_migration_{run_id}_{uuid.uuid4().hex[:6]}"
    url = await create_database(ADMIN_DATABASE_URL, name)
    try:
        await migrate(url, revision)
        yield url
    finally:
        await drop_database(ADMIN_DATABASE_URL, name)


@pytest.fixture
async def database_at_0002(run_id: str) -> AsyncIterator[str]:
    """Before tenants and roles."""
    async with database_at(run_id, "0002") as url:
        yield url


class TestTenantsMigration:
    async def test_existing_users_get_tenants_and_roles(self, database_at_0002: str) -> None:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        connection = await asyncpg.connect(database_at_0002.replace("+asyncpg", ""))
        try:
            for tenant, email, minutes in USERS_AT_0002:
                await connection.execute(
                    "INSERT INTO users (id, tenant_id, email, hashed_password, created_at) "
                    "VALUES ($1, $2, $3, 'x', $4)",
                    uuid.uuid4(),
                    tenant,
                    email,
                    start + timedelta(minutes=minutes),
                )

            await migrate(database_at_0002)

            tenants = await connection.fetch("SELECT id, created_at FROM tenants ORDER BY id")
            roles = await connection.fetch("SELECT tenant_id, email, role FROM users")
        finally:
            await connection.close()

        assert [(row["id"], row["created_at"]) for row in tenants] == [
            ("acme", start + timedelta(minutes=1)),
            ("globex", start + timedelta(minutes=2)),
        ]
        assert {(row["tenant_id"], row["email"]): row["role"] for row in roles} == {
            ("acme", "first@example.com"): "owner",
            ("acme", "second@example.com"): "member",
            ("acme", "third@example.com"): "member",
            ("globex", "early@example.com"): "owner",
            ("globex", "late@example.com"): "member",
        }

    async def test_a_tie_on_created_at_is_broken_by_id(self, database_at_0002: str) -> None:
        at = datetime(2026, 1, 1, tzinfo=UTC)
        ids = sorted(uuid.uuid4() for _ in range(3))
        connection = await asyncpg.connect(database_at_0002.replace("+asyncpg", ""))
        try:
            for number, user_id in enumerate(reversed(ids)):
                await connection.execute(
                    "INSERT INTO users (id, tenant_id, email, hashed_password, created_at) "
                    "VALUES ($1, 'tied', $2, 'x', $3)",
                    user_id,
                    f"user{number}@example.com",
                    at,
                )

            await migrate(database_at_0002)

            owners = await connection.fetch("SELECT id FROM users WHERE role = 'owner'")
        finally:
            await connection.close()

        assert [row["id"] for row in owners] == [ids[0]]


@pytest.fixture
async def database_at_0004(run_id: str) -> AsyncIterator[str]:
    """Before sessions carried their start."""
    async with database_at(run_id, "0004") as url:
        yield url


class TestSessionStartMigration:
    async def test_each_token_gets_its_sessions_first_token_creation(
        self, database_at_0004: str
    ) -> None:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        families = {uuid.uuid4(): [0, 15, 30], uuid.uuid4(): [60]}  # minutes after start
        connection = await asyncpg.connect(database_at_0004.replace("+asyncpg", ""))
        try:
            await connection.execute("INSERT INTO tenants (id) VALUES ('acme')")
            user_id = await connection.fetchval(
                "INSERT INTO users (id, tenant_id, email, hashed_password, role) "
                "VALUES ($1, 'acme', 'ada@example.com', 'x', 'owner') RETURNING id",
                uuid.uuid4(),
            )
            for family_id, minutes in families.items():
                for minute in minutes:
                    await connection.execute(
                        "INSERT INTO refresh_tokens (id, tenant_id, user_id, family_id, "
                        "token_hash, created_at, expires_at) "
                        "VALUES ($1, 'acme', $2, $3, $4, $5::timestamptz, "
                        "$5::timestamptz + interval '30 days')",
                        uuid.uuid4(),
                        user_id,
                        family_id,
                        uuid.uuid4().bytes * 2,
                        start + timedelta(minutes=minute),
                    )

            await migrate(database_at_0004)

            rows = await connection.fetch(
                "SELECT family_id, session_started_at FROM refresh_tokens"
            )
        finally:
            await connection.close()

        assert sorted((row["family_id"], row["session_started_at"]) for row in rows) == sorted(
            (family_id, start + timedelta(minutes=minutes[0]))
            for family_id, minutes in families.items()
            for _ in minutes
        )
