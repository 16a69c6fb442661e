"""The async engine, the session factory and the request-owned unit of work.

A request gets one session from :func:`get_session`; it commits when the endpoint returns and
rolls back when it raises. Services and repositories never commit: they ``flush`` when they need
the database to speak (an id, a unique violation). The dependency uses FastAPI's
``scope="function"`` so the commit happens *before* the response is sent: a 201 means committed
(a transaction in which a statement failed does not commit: :class:`TransactionAborted`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, NamedTuple

import sqlalchemy.ext.asyncio
from fastapi import Depends, Request
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import Connection, Insert, MetaData, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Session

from shared.settings import DatabaseSettings

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Write(NamedTuple):
    """A repository's INSERT and its parameters, for another repository to run in its own
    statement (as a data-modifying ``WITH``): rows that are written together, in one round
    trip to the database instead of one each."""

    statement: Insert
    parameters: Mapping[str, Any]


def create_engine(settings: DatabaseSettings, *, application_name: str) -> AsyncEngine:
    """A bounded pool; every connection names its service in pg_stat_activity, and every
    statement is a span of the trace that runs it: ``create_async_engine`` is looked up when
    called, so that the SQLAlchemy instrumentation (``shared.telemetry.configure_tracing``)
    traces the engine."""
    server_settings = {"application_name": application_name}
    if settings.database_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.database_statement_timeout_ms)
    engine = sqlalchemy.ext.asyncio.create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_timeout=settings.database_pool_timeout_seconds,
        pool_pre_ping=settings.database_pool_pre_ping,
        pool_recycle=1800,
        connect_args={
            "timeout": settings.database_connect_timeout_seconds,
            "server_settings": server_settings,
        },
    )
    refuse_commits_of_aborted_transactions(engine)
    return engine


class TransactionAborted(Exception):
    """A commit of a transaction in which a statement failed: PostgreSQL rolls it back."""

    def __init__(self) -> None:
        super().__init__(
            "a statement failed in this transaction, so the database rolls it back: not "
            "committed (roll back to a savepoint taken before the statement to go on)"
        )


# In Connection.info: a statement failed in the transaction under way, and no rollback to a
# savepoint has undone it since.
_ABORTED = "transaction_aborted"


def refuse_commits_of_aborted_transactions(engine: AsyncEngine) -> None:
    """Make a commit raise :class:`TransactionAborted` once a statement of its transaction has
    failed, instead of returning as if it had committed.

    PostgreSQL answers COMMIT of such a transaction with a ROLLBACK, and neither asyncpg nor
    SQLAlchemy says so: code that caught the error and went on would report committed (a 201)
    what the database threw away, and the session's ``after_commit`` hooks would run (the
    outbox relay would publish events of rows that do not exist). A rollback to a savepoint
    undoes the failure, as it does in the database: a savepoint can only be taken before it."""
    sync_engine = engine.sync_engine

    def failed(context: ExceptionContext) -> None:
        connection = context.connection
        if (
            connection is not None
            and isinstance(context.sqlalchemy_exception, DBAPIError)  # it reached the server
            and connection.in_transaction()
            and connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT"
        ):
            connection.info[_ABORTED] = True

    def clear(connection: Connection, *_: Any) -> None:
        connection.info.pop(_ABORTED, None)

    def commit(connection: Connection) -> None:
        if connection.info.pop(_ABORTED, False):
            # What COMMIT would have done. SQLAlchemy counts the transaction as ended either
            # way, so nothing else rolls it back: the connection would go back to the pool, and
            # to its next user, inside the aborted transaction.
            try:
                connection.connection.rollback()
            except Exception:
                connection.invalidate()  # in an unknown state: closed, not pooled
            raise TransactionAborted()

    event.listen(sync_engine, "handle_error", failed)
    event.listen(sync_engine, "begin", clear)
    event.listen(sync_engine, "rollback", clear)
    event.listen(sync_engine, "rollback_savepoint", clear)
    event.listen(sync_engine, "commit", commit)


def create_sessionmaker(
    engine: AsyncEngine, *, sync_session_class: type[Session] = Session
) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(
        engine, expire_on_commit=False, autoflush=False, sync_session_class=sync_session_class
    )


async def ping(engine: AsyncEngine) -> None:
    """Raise unless the database answers a trivial query (a readiness probe's: no span)."""
    with suppress_instrumentation():
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

# SQLSTATE classes and codes meaning "the database is away or overloaded", not "this query is
# wrong": connection exceptions, insufficient resources, operator intervention (shutdown,
# starting up), statement timeout or cancel, serialization failures and deadlocks.
_UNAVAILABLE_CLASSES = ("08", "53", "57")
_UNAVAILABLE_CODES = frozenset({"40001", "40P01", "55P03", "57014"})


def _sqlstate(exc: BaseException) -> str | None:
    for candidate in (exc, getattr(exc, "orig", None), getattr(exc, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


# SQLSTATE classes that blame the statement's values: data exceptions (a NUL character, a value
# out of range) and integrity constraint violations.
_VALUES_CLASSES = ("22", "23")


def values_refused(exc: BaseException) -> bool:
    """Whether ``exc`` says the database refuses the values of this statement, so that the same
    statement with other values would pass: the item is at fault, not the database. A read-only
    database (a failover), a missing privilege or table refuse every statement instead."""
    state = _sqlstate(exc)
    return state is not None and state.startswith(_VALUES_CLASSES)


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached or is not taking work right now
    (worth retrying later), as opposed to refusing this query."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError | OSError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    state = _sqlstate(exc)
    return state is not None and (
        state.startswith(_UNAVAILABLE_CLASSES) or state in _UNAVAILABLE_CODES
    )
