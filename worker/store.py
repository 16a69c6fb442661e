"""The worker's reads and writes of ``campaign_job_logs``, with group commit.

Deliveries are handled concurrently; each one hands its question ("is there a success row?")
or its row to a batcher and waits for the answer. A batcher takes whatever has queued up, runs
one statement for all of it, and answers each caller. Under load the batches grow and the
database does a fraction of the work per message; when idle, a batch is a single item written
at once. Nothing is acknowledged before its own row is committed.

Each batcher loop keeps one connection in autocommit mode (every statement here is atomic by
itself), so a batch costs one round trip: no pool checkout, ping, BEGIN or COMMIT around it.

A batch that cannot reach the database is retried with backoff for as long as it takes (or
until the worker stops): its messages are held, neither acknowledged nor dead-lettered, and no
attempt of a campaign is spent on an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, Generic, TypeVar

from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import Integer, String, Text, Uuid

from shared.db import database_unavailable
from shared.events import CampaignCreated
from shared.models import JobStatus

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")
Run = Callable[[AsyncConnection, Sequence[Item]], Awaitable[list[Answer]]]
Retrying = Callable[[Callable[[], Awaitable[list[Answer]]]], Awaitable[list[Answer]]]


class ShuttingDown(Exception):
    """The worker is stopping while a write waits for the database."""


class Standing(Enum):
    """Where an event stands before it is executed."""

    NEW = "new"  # a campaign of the event's tenant, not yet done
    DONE = "done"  # its success row exists
    UNKNOWN_CAMPAIGN = "unknown campaign"  # no such campaign in the event's tenant: poison


class Recorded(Enum):
    WRITTEN = "written"
    ALREADY_THERE = "already there"  # this step's row exists (a redelivery), or a success does
    UNKNOWN_CAMPAIGN = "unknown campaign"  # no such campaign in the event's tenant: poison


@dataclass(slots=True)
class _Pending(Generic[Item, Answer]):
    item: Item
    future: asyncio.Future[tuple[Answer, int]]  # the answer, and the size of its batch


class _Connection:
    """One batcher loop's connection, in autocommit mode, opened on first use and again after
    a failure."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._connection: AsyncConnection | None = None

    async def run(self, run: Run[Item, Answer], items: Sequence[Item]) -> list[Answer]:
        with suppress_instrumentation():  # a batch statement belongs to no single trace
            if self._connection is None:
                self._connection = await self._engine.connect()
            try:
                return await run(self._connection, items)
            except Exception:
                await self.close()
                raise

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


class _Batcher(Generic[Item, Answer]):
    """Collects items from concurrent callers and answers them one statement per batch, with
    ``writers`` loops (and connections) working at once."""

    def __init__(
        self,
        name: str,
        run: Run[Item, Answer],
        *,
        engine: AsyncEngine,
        max_batch: int,
        writers: int,
        retrying: Retrying[Answer],
    ) -> None:
        self._name = name
        self._run = run
        self._engine = engine
        self._max_batch = max_batch
        self._writers = writers
        self._retrying = retrying
        self._queue: asyncio.Queue[_Pending[Item, Answer]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(), name=f"{self._name}-{n}")
            for n in range(self._writers)
        ]

    async def stop(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown())

    async def submit(self, item: Item) -> tuple[Answer, int]:
        """The answer for ``item``, and how many items its batch held."""
        if self._closed:  # a handler outliving the grace period: it requeues its message
            raise ShuttingDown()
        future: asyncio.Future[tuple[Answer, int]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future))
        return await future

    async def _loop(self) -> None:
        connection = _Connection(self._engine)
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < self._max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                try:
                    await self._answer(connection, batch)
                except asyncio.CancelledError:
                    self._fail(batch, ShuttingDown())
                    raise
        finally:
            await connection.close()

    async def _answer(self, connection: _Connection, batch: list[_Pending[Item, Answer]]) -> None:
        items = [pending.item for pending in batch]
        try:
            answers = await self._retrying(partial(connection.run, self._run, items))
        except ShuttingDown as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            # The database refused the batch (not an outage): answer item by item, so one bad
            # item fails alone and the others go through.
            logger.warning(
                "batch refused; retrying its items one by one",
                extra={"batch": self._name, "size": len(batch), "error": repr(exc)},
            )
            for pending in batch:
                await self._answer(connection, [pending])
            return
        for pending, answer in zip(batch, answers, strict=True):
            if not pending.future.done():
                pending.future.set_result((answer, len(batch)))

    @staticmethod
    def _fail(batch: list[_Pending[Item, Answer]], exc: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)


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
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        retry_max_seconds: float,
        stopping: asyncio.Event,
        max_batch: int = 500,
        writers: int = 2,
    ) -> None:
        self._retry_max = retry_max_seconds
        self._stopping = stopping
        self._checks: _Batcher[CampaignCreated, Standing] = _Batcher(
            "success-check",
            _check,
            engine=engine,
            max_batch=max_batch,
            writers=writers,
            retrying=self._retrying,
        )
        self._writes: _Batcher[JobRow, Recorded] = _Batcher(
            "job-log-write",
            _write,
            engine=engine,
            max_batch=max_batch,
            writers=writers,
            retrying=self._retrying,
        )

    def start(self) -> None:
        self._checks.start()
        self._writes.start()

    async def stop(self) -> None:
        await self._checks.stop()
        await self._writes.stop()

    async def standing(self, event: CampaignCreated) -> Standing:
        """Whether the event's success row exists, and whether it names a campaign of its own
        tenant (checked before executing it: a forged or stray event runs nothing)."""
        standing, _ = await self._checks.submit(event)
        return standing

    async def record(
        self,
        event: CampaignCreated,
        *,
        status: JobStatus,
        attempt: int,
        last_error: str | None = None,
        trace_id: str | None = None,
    ) -> Recorded:
        """Write this step's row, once: a second write of the same step (or a second success of
        the event) changes nothing. The row is written only for a campaign of the event's tenant.
        """
        row = JobRow(event, status, attempt, last_error, trace_id)
        # The row's insert in the message's trace; the statement itself serves a whole batch.
        span = tracer.start_span(
            "INSERT campaign_job_logs", kind=trace.SpanKind.CLIENT, attributes=_SPAN_ATTRIBUTES
        )
        try:
            recorded, batch_size = await self._writes.submit(row)
        except BaseException:
            span.end()
            raise
        if span.is_recording():
            span.set_attribute("db.batch.size", batch_size)
            span.set_attribute("campaign.recorded", recorded.value)
        span.end()
        return recorded

    async def _retrying(self, operation: Callable[[], Awaitable[Answer]]) -> Answer:
        delay = 0.1
        while True:
            try:
                return await operation()
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                if self._stopping.is_set():
                    raise ShuttingDown from exc
                logger.warning(
                    "database unavailable; holding the messages and retrying",
                    extra={"error": repr(exc), "retry_in_seconds": delay},
                )
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                delay = min(delay * 2, self._retry_max)
            else:
                raise ShuttingDown
