"""The outbox table: rows written with the change that caused them, published by the relay."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Insert,
    Interval,
    Table,
    Uuid,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from shared.db import Write
from shared.events import CampaignCreated
from shared.messaging import CAMPAIGNS_EXCHANGE
from shared.models import OutboxMessage

_OUTBOX = cast(Table, OutboxMessage.__table__)
_IDS = bindparam("ids", type_=ARRAY(Uuid()))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An outbox row's message, as the relay publishes it."""

    id: uuid.UUID  # the event id, the AMQP message_id
    exchange: str
    routing_key: str
    payload: dict[str, Any]
    headers: dict[str, Any]


@dataclass(slots=True)
class Handover:
    """On a session (``session.info[HANDOVER]``) of a process that publishes the outbox rows it
    commits itself, at once (:class:`campaign_service.outbox.relay.OutboxRelay`): how long the
    poll of every replica leaves those rows alone (a row still there after that was not
    published, and any relay takes it), and the messages of the transaction under way, each
    with the savepoint it was written in (None: the transaction itself)."""

    claim_after: timedelta
    staged: list[tuple[SessionTransaction | None, Outgoing]] = field(default_factory=list)

    def stage(self, session: Session, message: Outgoing) -> None:
        self.staged.append((session.get_nested_transaction(), message))

    def committed(self) -> list[Outgoing]:
        """What the transaction wrote, now committed: taken, to publish."""
        messages = [message for _, message in self.staged]
        self.staged.clear()
        return messages

    def rolled_back(self, transaction: SessionTransaction) -> None:
        """Forget what ``transaction`` wrote: all of it when it is the whole transaction, the
        messages of a savepoint and of the savepoints inside it when it is one."""
        if transaction.parent is None:
            self.staged.clear()
            return
        self.staged = [
            (written_in, message)
            for written_in, message in self.staged
            if not _within(written_in, transaction)
        ]


def _within(inner: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while inner is not None:
        if inner is outer:
            return True
        inner = inner.parent
    return False


HANDOVER = "outbox_handover"
# Built once, as the campaign's insert: the request path runs them with parameters only.
_INSERT = insert(_OUTBOX)
# From the statement's time, not the transaction's start (now()), so the window is not spent
# by a long transaction before its commit.
_INSERT_HANDED_OVER = insert(_OUTBOX).values(
    available_at=func.statement_timestamp() + bindparam("claim_after", type_=Interval())
)


@functools.lru_cache(maxsize=32)
def _written_with(statement: Insert, other: Insert) -> Insert:
    """``statement`` with ``other`` in its WITH clause: both inserts, one statement (made once
    for each pair: a statement built per call costs more than it runs)."""
    return statement.add_cte(other.cte())


def outbox_write(
    event: CampaignCreated,
    *,
    headers: dict[str, str] | None = None,
    together_with: Write | None = None,
    claim_after: timedelta | None = None,
) -> tuple[Outgoing, Insert, dict[str, Any]]:
    """The event's message, and the statement and parameters that write its row; with
    ``together_with`` (the row of the change the event tells of), both rows in one statement;
    with ``claim_after``, a row the poll leaves alone that long (see :class:`Handover`)."""
    message = Outgoing(
        event.event_id,
        CAMPAIGNS_EXCHANGE.name,
        event.event_type,
        event.model_dump(mode="json"),
        headers or {},
    )
    values: dict[str, Any] = {
        "id": message.id,
        "tenant_id": event.tenant_id,
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "payload": message.payload,
        "headers": message.headers,
    }
    statement = _INSERT
    if claim_after is not None:
        statement = _INSERT_HANDED_OVER
        values["claim_after"] = claim_after
    if together_with is not None:
        if clash := values.keys() & together_with.parameters.keys():
            raise ValueError(f"parameters named as the outbox row's: {sorted(clash)}")
        statement = _written_with(statement, together_with.statement)
        values.update(together_with.parameters)
    return message, statement, values


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self,
        event: CampaignCreated,
        *,
        headers: dict[str, str] | None = None,
        together_with: Write | None = None,
    ) -> None:
        """The event's row, in the caller's transaction; with ``together_with`` (the row of the
        change the event tells of), both rows in one statement."""
        handover: Handover | None = self._session.info.get(HANDOVER)
        # Without a hand-over, any relay's poll takes the row once it is committed.
        message, statement, values = outbox_write(
            event,
            headers=headers,
            together_with=together_with,
            claim_after=handover.claim_after if handover is not None else None,
        )
        await self._session.execute(statement, values)
        if handover is not None:
            handover.stage(self._session.sync_session, message)

    async def claim(self, limit: int) -> list[tuple[Outgoing, int]]:
        """Lock up to ``limit`` due rows, oldest first: each row's message and how many
        publishes of it were refused so far. Rows another relay holds are skipped, so replicas
        share the work without publishing a row twice at the same time."""
        statement = (
            select(
                _OUTBOX.c.id,
                _OUTBOX.c.exchange,
                _OUTBOX.c.routing_key,
                _OUTBOX.c.payload,
                _OUTBOX.c.headers,
                _OUTBOX.c.attempts,
            )
            .where(_OUTBOX.c.available_at <= func.now())
            .order_by(_OUTBOX.c.available_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = (await self._session.execute(statement)).all()
        return [(Outgoing(*row[:5]), row.attempts) for row in rows]

    async def delete(self, ids: Sequence[uuid.UUID]) -> None:
        # On the table, not the mapped class: no ORM bulk delete looking for objects to expire.
        # The ids as one array parameter: an IN list takes one parameter an id, and asyncpg
        # refuses more than 32,767 (a pass of the fast path may confirm more).
        await self._session.execute(
            delete(_OUTBOX).where(_OUTBOX.c.id == any_(_IDS)), {"ids": list(ids)}
        )

    async def reschedule(self, message_id: uuid.UUID, *, error: str, delay: timedelta) -> None:
        await self._session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == message_id)
            .values(
                attempts=OutboxMessage.attempts + 1,
                last_error=error[:2000],
                available_at=func.now() + delay,
            )
        )

    async def backlog(self) -> tuple[int, datetime | None]:
        """How many rows wait, and when the oldest was written."""
        row = (
            await self._session.execute(
                select(func.count(), func.min(OutboxMessage.created_at)).select_from(OutboxMessage)
            )
        ).one()
        return row[0], row[1]
