"""Apply the migration history: ``python -m shared.migrate``.

Safe to run from every replica at once: a PostgreSQL advisory lock lets one process migrate
while the others wait, then find nothing left to do. docker-compose.yml runs it once before
the services start; ./scripts/run-local runs it (with --create-database) before it starts them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from shared.logs import configure_logging
from shared.settings import DatabaseSettings

logger = logging.getLogger("shared.migrate")

# Any constant shared by every migrating process; "campaigns" in ASCII.
MIGRATION_LOCK_ID = 0x63616D706169676E
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def migrate(database_url: str, revision: str = "head") -> None:
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(
                text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID}
            )
            await connection.commit()
            try:
                await connection.run_sync(_upgrade, revision)
                await connection.commit()
            finally:
                await connection.execute(
                    text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID}
                )
                await connection.commit()
    finally:
        await engine.dispose()
    logger.info("database migrated", extra={"revision": revision})


async def create_database_if_missing(database_url: str) -> None:
    """Create the database DATABASE_URL names, through the server's ``postgres`` database.

    For local runs; in containers the PostgreSQL image creates it.
    """
    url = make_url(database_url)
    engine = create_async_engine(
        url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as connection:
            exists = await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
            )
            if not exists:
                quoted = connection.dialect.identifier_preparer.quote(url.database or "")
                await connection.execute(text(f"CREATE DATABASE {quoted}"))
                logger.info("database created", extra={"database": url.database})
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description="Apply the migration history to DATABASE_URL.")
    parser.add_argument(
        "--create-database", action="store_true", help="create the database first if missing"
    )
    args = parser.parse_args()
    settings = DatabaseSettings(service_name="migrate")
    configure_logging(settings)

    async def run() -> None:
        if args.create_database:
            await create_database_if_missing(settings.database_url)
        await migrate(settings.database_url)

    asyncio.run(run())


if __name__ == "__main__":
    main()
