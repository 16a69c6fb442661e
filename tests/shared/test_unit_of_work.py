"""The request-owned unit of work: a 2xx means committed.

PostgreSQL answers COMMIT of a transaction in which a statement failed with a ROLLBACK, and
neither asyncpg nor SQLAlchemy reports it, so a route that catches a database error and goes on
would answer 201 for rows that were thrown away (shared.db.refuse_commits_of_aborted_transactions).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import SessionDep, create_engine, create_sessionmaker
from shared.errors import install_error_handlers
from shared.settings import DatabaseSettings


def make_app(engine: AsyncEngine) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.state.sessionmaker = create_sessionmaker(engine)

    async def insert(session: SessionDep, name: str) -> None:
        statement = text("INSERT INTO unit_of_work_rows (name) VALUES (:name)")
        await session.execute(statement, {"name": name})

    @app.post("/caught", status_code=201)
    async def caught(session: SessionDep) -> None:
        """Writes a row, then a statement fails and the error is swallowed."""
        await insert(session, "caught")
        with contextlib.suppress(DBAPIError):
            await session.execute(text("SELECT 1 / 0"))

    @app.post("/savepoint", status_code=201)
    async def savepoint(session: SessionDep) -> None:
        """As /caught, but the failing statement runs in a savepoint that rolls back."""
        await insert(session, "before the savepoint")
        try:
            async with session.begin_nested():
                await session.execute(text("SELECT 1 / 0"))
        except DBAPIError:
            pass
        await insert(session, "after the savepoint")

    @app.post("/plain", status_code=201)
    async def plain(session: SessionDep) -> None:
        await insert(session, "plain")

    return app


@pytest.fixture
async def client(database_url: str, db_engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with db_engine.begin() as connection:
        await connection.execute(text("CREATE TABLE IF NOT EXISTS unit_of_work_rows (name text)"))
        await connection.execute(text("TRUNCATE unit_of_work_rows"))
    # One connection, so that every request after the first gets the one the first used.
    settings = DatabaseSettings(database_url=database_url, database_pool_size=1)
    engine = create_engine(settings, application_name="unit-of-work-test")
    transport = httpx.ASGITransport(app=make_app(engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    await engine.dispose()


async def stored(db_engine: AsyncEngine) -> list[str]:
    async with db_engine.connect() as connection:
        result = await connection.execute(text("SELECT name FROM unit_of_work_rows ORDER BY name"))
        return list(result.scalars())


class TestUnitOfWork:
    async def test_a_request_whose_transaction_the_database_aborted_is_not_a_success(
        self, client: httpx.AsyncClient, db_engine: AsyncEngine
    ) -> None:
        response = await client.post("/caught")

        assert response.status_code == 500
        assert await stored(db_engine) == []

    async def test_the_connection_of_an_aborted_transaction_serves_the_next_request(
        self, client: httpx.AsyncClient, db_engine: AsyncEngine
    ) -> None:
        assert (await client.post("/caught")).status_code == 500

        response = await client.post("/plain")

        assert response.status_code == 201
        assert await stored(db_engine) == ["plain"]

    async def test_a_failure_rolled_back_to_a_savepoint_commits_the_rest(
        self, client: httpx.AsyncClient, db_engine: AsyncEngine
    ) -> None:
        response = await client.post("/savepoint")

        assert response.status_code == 201
        assert await stored(db_engine) == ["after the savepoint", "before the savepoint"]
