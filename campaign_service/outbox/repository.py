"""The outbox table: rows written with the change that caused them, published by the relay."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Interval, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.events import CampaignCreated
from shared.messaging import CAMPAIGNS_EXCHANGE
from shared.models import OutboxMessage

_OUTBOX = cast(Table, OutboxMessage.__table__)


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
    commits itself, at once (:class:`campaign_service.outbox.relay.OutboxRelay`): the messages
    of the transaction under way, and how long the poll of every replica leaves its rows alone
    (a row still there after that was not published, and any relay takes it)."""

    claim_after: timedelta
    messages: list[Outgoing] = field(default_factory=list)


HANDOVER = "outbox_handover"
# Built once, as the campaign's insert: the request path runs them with parameters only.
_INSERT = insert(_OUTBOX)
_INSERT_HANDED_OVER = insert(_OUTBOX).values(
    available_at=func.now() + bindparam("claim_after", type_=Interval())
)


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, event: CampaignCreated, *, headers: dict[str, str] | None = None) -> None:
        message = Outgoing(
            event.event_id,
            CAMPAIGNS_EXCHANGE.name,
            event.event_type,
            event.model_dump(mode="json"),
            headers or {},
        )
        values = {
            "id": message.id,
            "tenant_id": event.tenant_id,
            "exchange": message.exchange,
            "routing_key": message.routing_key,
            "payload": message.payload,
            "headers": message.headers,
        }
        handover: Handover | None = self._session.info.get(HANDOVER)
        if handover is None:  # any relay's poll takes the row once it is committed
            await self._session.execute(_INSERT, values)
            return
        await self._session.execute(
            _INSERT_HANDED_OVER, {**values, "claim_after": handover.claim_after}
        )
        handover.messages.append(message)

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
        await self._session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))

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
