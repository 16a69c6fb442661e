from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import shared.models  # noqa: F401
from shared.db import Base
from shared.migrate import migrate


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
