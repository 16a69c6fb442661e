"""Which database errors mean "away, retry later" (the worker holds the message, the services
answer 503) and which mean "this query is wrong"."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError

from shared.db import database_unavailable


def wrapped(error: Exception) -> DBAPIError:
    """As SQLAlchemy's asyncpg dialect hands a server error to the caller."""
    return DBAPIError("statement", {}, error)


class TestDatabaseUnavailable:
    @pytest.mark.parametrize(
        "error",
        [
            asyncpg.CannotConnectNowError("the database system is starting up"),
            asyncpg.AdminShutdownError("terminating connection due to administrator command"),
            asyncpg.TooManyConnectionsError("sorry, too many clients already"),
            asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
            asyncpg.SerializationError("could not serialize access"),
            asyncpg.DeadlockDetectedError("deadlock detected"),
        ],
        ids=lambda error: type(error).__name__,
    )
    def test_server_going_away_or_overloaded(self, error: Exception) -> None:
        assert database_unavailable(wrapped(error))

    @pytest.mark.parametrize(
        "error", [ConnectionRefusedError(), TimeoutError(), OSError("network unreachable")]
    )
    def test_network_failures(self, error: Exception) -> None:
        assert database_unavailable(error)

    @pytest.mark.parametrize(
        "error",
        [
            IntegrityError("insert", {}, asyncpg.UniqueViolationError("duplicate key")),
            ProgrammingError("select", {}, asyncpg.UndefinedTableError("no such table")),
            wrapped(asyncpg.DataError("invalid input syntax")),
            ValueError("a bug"),
        ],
        ids=lambda error: type(error).__name__,
    )
    def test_refused_queries_are_not_outages(self, error: Exception) -> None:
        assert not database_unavailable(error)
