"""The worker's reads and writes of ``campaign_job_logs``, a batch of deliveries at a time.

The consumer hands the processor a batch of deliveries; the store answers the whole batch with
one statement each: which events are done or name no campaign of their tenant (before anything
is executed), and the batch's rows (after). Nothing is acknowledged before its own row is
committed: every statement here is atomic by itself and runs in autocommit, so a batch costs one
round trip, with no pool checkout, BEGIN or COMMIT around it.

A statement that cannot reach the database, or that the database refuses whatever its values
(read-only after a failover, a privilege or a table missing after a bad deploy), is retried with
backoff for as long as it takes (or until the worker stops), on a new connection each time: the
batch's messages are held, neither acknowledged nor dead-lettered, and no attempt of a campaign
is spent on it. A batch whose values the database refuses (a data exception or a constraint
violation) is tried again item by item, so one bad item fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import Integer, String, Text, Uuid

from shared.db import database_unavailable, values_refused
from shared.events import CampaignCreated
from shared.models import JobStatus

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")
Statement = Callable[[AsyncConnection, Sequence[Item]], Awaitable[list[Answer]]]


class ShuttingDown(Exception):
    """The worker is stopping while a statement waits for the database."""


class Standing(Enum):
    """Where an event stands before it is executed."""

    NEW = "new"  # a campaign of the event's tenant, not yet done
    DONE = "done"  # its success row exists
    UNKNOWN_CAMPAIGN = "unknown campaign"  # no such campaign in the event's tenant: poison
    REFUSED = "refused"  # the database refuses this event's values (not an outage): poison


class Recorded(Enum):
    WRITTEN = "written"
    ALREADY_THERE = "already there"  # this step's row exists (a redelivery), or a success does
    UNKNOWN_CAMPAIGN = "unknown campaign"  # no such campaign in the event's tenant: poison
    REFUSED = "refused"  # the database refuses this row's values (not an outage): poison


@dataclass(frozen=True, slots=True)
class JobRow:
    event: CampaignCreated
    status: JobStatus
    attempt: int
    last_error: str | None
    trace_id: str | None

    @property
    def key(self) -> tuple[uuid.UUID, str, int]:
        # A success is unique per event; other steps per (event, attempt, status).
        attempt = 0 if self.status is JobStatus.SUCCESS else self.attempt
        return self.event.event_id, self.status.value, attempt


_STANDINGS = text(
    """
    SELECT i.ord,
           EXISTS (
               SELECT 1 FROM campaign_job_logs AS l
               WHERE l.event_id = i.event_id AND l.status = 'success'
           ) AS done,
           EXISTS (
               SELECT 1 FROM campaigns AS c
               WHERE c.id = i.campaign_id AND c.tenant_id = i.tenant_id
           ) AS known
    FROM unnest(:ords, :event_ids, :campaign_ids, :tenant_ids)
        AS i(ord, event_id, campaign_id, tenant_id)
    ORDER BY i.ord
    """
).bindparams(
    bindparam("ords", type_=ARRAY(Integer())),
    bindparam("event_ids", type_=ARRAY(Uuid())),
    bindparam("campaign_ids", type_=ARRAY(Uuid())),
    bindparam("tenant_ids", type_=ARRAY(String())),
)

# Only rows of a campaign of the event's own tenant are written (the join); conflicts with an
# existing row of the same step, or with the event's success, write nothing.
INSERT_SQL = """
WITH input AS (
    SELECT * FROM unnest(
        :ords, :campaign_ids, :tenant_ids, :event_ids, :statuses,
        :payloads, :attempts, :last_errors, :trace_ids
    ) AS t(ord, campaign_id, tenant_id, event_id, status, payload, attempts, last_error, trace_id)
), inserted AS (
    INSERT INTO campaign_job_logs
        (campaign_id, tenant_id, event_id, status, payload, attempts, last_error, trace_id)
    SELECT i.campaign_id, i.tenant_id, i.event_id, i.status, i.payload::jsonb, i.attempts,
           i.last_error, i.trace_id
    FROM input AS i
    JOIN campaigns AS c ON c.id = i.campaign_id AND c.tenant_id = i.tenant_id
    ON CONFLICT DO NOTHING
    RETURNING event_id, status, attempts
)
SELECT i.ord,
       EXISTS (
           SELECT 1 FROM inserted AS x
           WHERE x.event_id = i.event_id AND x.status = i.status AND x.attempts = i.attempts
       ) AS written,
       EXISTS (
           SELECT 1 FROM campaigns AS c WHERE c.id = i.campaign_id AND c.tenant_id = i.tenant_id
       ) AS known
FROM input AS i
ORDER BY i.ord
"""
_INSERT = text(INSERT_SQL).bindparams(
    bindparam("ords", type_=ARRAY(Integer())),
    bindparam("campaign_ids", type_=ARRAY(Uuid())),
    bindparam("tenant_ids", type_=ARRAY(String())),
    bindparam("event_ids", type_=ARRAY(Uuid())),
    bindparam("statuses", type_=ARRAY(String())),
    bindparam("payloads", type_=ARRAY(Text())),  # JSON text, cast in SQL: no per-item encoding
    bindparam("attempts", type_=ARRAY(Integer())),
    bindparam("last_errors", type_=ARRAY(Text())),
    bindparam("trace_ids", type_=ARRAY(String())),
)
_SPAN_ATTRIBUTES = {
    "db.system": "postgresql",
    "db.operation": "INSERT",
    "db.sql.table": "campaign_job_logs",
    "db.statement": " ".join(INSERT_SQL.split()),
}


def _insert_span(
    parent: trace.Span, started: int, attributes: dict[str, Any], *, error: bool = False
) -> None:
    """A row's insert span, in its delivery's trace, made once the statement has answered (with
    the statement's start time): every attribute given at once, the cheapest way to make one."""
    span = tracer.start_span(
        "INSERT campaign_job_logs",
        context=trace.set_span_in_context(parent),
        kind=trace.SpanKind.CLIENT,
        attributes={**_SPAN_ATTRIBUTES, **attributes},
        start_time=started,
    )
    if error:
        span.set_status(trace.StatusCode.ERROR)
    span.end()


async def _check(connection: AsyncConnection, events: Sequence[CampaignCreated]) -> list[Standing]:
    params = {
        "ords": list(range(len(events))),
        "event_ids": [event.event_id for event in events],
        "campaign_ids": [event.campaign_id for event in events],
        "tenant_ids": [event.tenant_id for event in events],
    }
    return [
        Standing.DONE if done else Standing.NEW if known else Standing.UNKNOWN_CAMPAIGN
        for _, done, known in (await connection.execute(_STANDINGS, params)).all()
    ]


async def _write(connection: AsyncConnection, rows: Sequence[JobRow]) -> list[Recorded]:
    # The same step twice in one batch (two deliveries of one message): write it once.
    first: dict[tuple[uuid.UUID, str, int], int] = {}
    for index, row in enumerate(rows):
        first.setdefault(row.key, index)
    unique = [rows[index] for index in sorted(first.values())]
    params: dict[str, list[Any]] = {
        "ords": list(range(len(unique))),
        "campaign_ids": [row.event.campaign_id for row in unique],
        "tenant_ids": [row.event.tenant_id for row in unique],
        "event_ids": [row.event.event_id for row in unique],
        "statuses": [row.status.value for row in unique],
        "payloads": [row.event.model_dump_json() for row in unique],
        "attempts": [row.attempt for row in unique],
        "last_errors": [row.last_error for row in unique],
        "trace_ids": [row.trace_id for row in unique],
    }
    results = (await connection.execute(_INSERT, params)).all()
    outcome = {
        unique[ord_].key: (
            Recorded.WRITTEN
            if written
            else Recorded.ALREADY_THERE
            if known
            else Recorded.UNKNOWN_CAMPAIGN
        )
        for ord_, written, known in results
    }
    answers = []
    for index, row in enumerate(rows):
        answer = outcome[row.key]
        if first[row.key] != index and answer is Recorded.WRITTEN:
            answer = Recorded.ALREADY_THERE  # its twin earlier in the batch wrote the row
        answers.append(answer)
    return answers


class JobLogStore:
    """One connection of its own (opened on first use, and again after a failure), used by one
    batch at a time: the consumer processes its batches in order."""

    def __init__(
        self, engine: AsyncEngine, *, retry_max_seconds: float, stopping: asyncio.Event
    ) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._connection: AsyncConnection | None = None
        self._retry_max = retry_max_seconds
        self._stopping = stopping
        self._closed = False

    async def stop(self) -> None:
        self._closed = True
        await self._close()

    async def standings(self, events: Sequence[CampaignCreated]) -> list[Standing]:
        """Whether each event's success row exists, and whether it names a campaign of its own
        tenant (checked before executing it: a forged or stray event runs nothing)."""
        if not events:  # a batch of dead letters and poison: nothing to ask
            return []
        return await self._answer(_check, events, refused=Standing.REFUSED)

    async def record(
        self, rows: Sequence[JobRow], *, traces: Sequence[trace.Span]
    ) -> list[Recorded]:
        """Write each row's step, once: a second write of the same step (or a second success of
        an event) changes nothing. A row is written only for a campaign of its event's tenant.

        ``traces`` are the deliveries' spans, one a row: each row's insert is a span of its own
        delivery's trace, though one statement serves the whole batch."""
        started = time.time_ns()
        try:
            recorded = await self._answer(_write, rows, refused=Recorded.REFUSED)
        except BaseException as exc:
            # Not written: an error, unless the worker is stopping (its deliveries go back).
            stopping = isinstance(exc, ShuttingDown | asyncio.CancelledError)
            attributes = {"db.batch.size": len(rows), "error.type": type(exc).__name__}
            for parent in traces:
                _insert_span(parent, started, attributes, error=not stopping)
            raise
        for parent, outcome in zip(traces, recorded, strict=True):
            attributes = {"db.batch.size": len(rows), "campaign.recorded": outcome.value}
            _insert_span(parent, started, attributes)
        return recorded

    async def _answer(
        self, statement: Statement[Item, Answer], items: Sequence[Item], *, refused: Answer
    ) -> list[Answer]:
        """The statement's answers; an item whose values the database refuses gets
        ``refused``, and the others their own answers."""
        try:
            return await self._retrying(statement, items)
        except ShuttingDown:
            raise
        except Exception as exc:
            if len(items) == 1:
                logger.error(
                    "the database refused an item; it will be dead-lettered",
                    extra={"statement": statement.__name__, "error": repr(exc)},
                )
                return [refused]
            logger.warning(
                "batch refused; retrying its items one by one",
                extra={"size": len(items), "error": repr(exc)},
            )
        answers: list[Answer] = []
        for item in items:
            answers.extend(await self._answer(statement, [item], refused=refused))
        return answers

    async def _run(self, statement: Statement[Item, Answer], items: Sequence[Item]) -> list[Answer]:
        if self._closed:  # a batch outliving the grace period: its messages are requeued
            raise ShuttingDown()
        with suppress_instrumentation():  # a batch statement belongs to no single trace
            if self._connection is None:
                self._connection = await self._engine.connect()
            try:
                return await statement(self._connection, items)
            except Exception:
                # Not back to the pool: it may be bound to a node that now refuses writes.
                await self._close(discard=True)
                raise

    async def _close(self, *, discard: bool = False) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                if discard:
                    await connection.invalidate()
                await connection.close()

    async def _retrying(
        self, statement: Statement[Item, Answer], items: Sequence[Item]
    ) -> list[Answer]:
        delay = 0.1
        while True:
            try:
                return await self._run(statement, items)
            except ShuttingDown:
                raise
            except Exception as exc:
                if values_refused(exc):
                    raise  # this batch's values: _answer finds the item at fault
                if self._stopping.is_set():
                    raise ShuttingDown from exc
                if database_unavailable(exc):
                    logger.warning(
                        "database unavailable; holding the messages and retrying",
                        extra={"error": repr(exc), "retry_in_seconds": delay},
                    )
                else:
                    # Refused whatever the values: dead-lettering would throw away every
                    # campaign, executed already, until someone mends the database.
                    logger.error(
                        "the database refuses the statement, not its values; holding the "
                        "messages and retrying",
                        extra={"error": repr(exc), "retry_in_seconds": delay},
                    )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                delay = min(delay * 2, self._retry_max)
            else:
                raise ShuttingDown
