"""The outbox table: rows written with the change that caused them, claimed by the relay."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.events import CampaignCreated
from shared.messaging import CAMPAIGNS_EXCHANGE
from shared.models import OutboxMessage

_OUTBOX = cast(Table, OutboxMessage.__table__)
# Set on a session that wrote an outbox row; the relay is woken when that session commits.
PENDING_FLAG = "outbox_pending"
# Built once, as the campaign's insert: the request path runs it with parameters only.
_INSERT = insert(_OUTBOX)


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, event: CampaignCreated, *, headers: dict[str, str] | None = None) -> None:
        await self._session.execute(
            _INSERT,
            {
                "id": event.event_id,
                "tenant_id": event.tenant_id,
                "exchange": CAMPAIGNS_EXCHANGE.name,
                "routing_key": event.event_type,
                "payload": event.model_dump(mode="json"),
                "headers": headers or {},
            },
        )
        self._session.info[PENDING_FLAG] = True

    async def claim(self, limit: int) -> Sequence[OutboxMessage]:
        """Lock up to ``limit`` due rows, oldest first. Rows another relay holds are skipped, so
        replicas share the work without publishing a row twice at the same time."""
        statement = (
            select(OutboxMessage)
            .where(OutboxMessage.available_at <= func.now())
            .order_by(OutboxMessage.available_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return (await self._session.scalars(statement)).all()

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
