"""Which database errors mean "away, retry later" (the worker holds the message, the services
answer 503), which mean "this query is wrong", and which blame the statement's values (the
worker dead-letters that one item)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError

from shared.db import database_unavailable, values_refused


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


class TestValuesRefused:
    @pytest.mark.parametrize(
        "error",
        [
            wrapped(asyncpg.CharacterNotInRepertoireError("invalid byte sequence: 0x00")),
            wrapped(asyncpg.NumericValueOutOfRangeError("value out of range")),
            IntegrityError("insert", {}, asyncpg.ForeignKeyViolationError("no such campaign")),
            IntegrityError("insert", {}, asyncpg.UniqueViolationError("duplicate key")),
        ],
        ids=lambda error: type(error.orig).__name__,
    )
    def test_data_exceptions_and_constraint_violations(self, error: DBAPIError) -> None:
        assert values_refused(error)

    @pytest.mark.parametrize(
        "error",
        [
            wrapped(asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only")),
            wrapped(asyncpg.InsufficientPrivilegeError("permission denied for table")),
            ProgrammingError("select", {}, asyncpg.UndefinedTableError("no such table")),
            wrapped(asyncpg.AdminShutdownError("terminating connection")),
            ConnectionRefusedError(),
            ValueError("a bug"),
        ],
        ids=lambda error: type(getattr(error, "orig", None) or error).__name__,
    )
    def test_what_refuses_every_statement_does_not_blame_the_values(self, error: Exception) -> None:
        assert not values_refused(error)
