"""The outbox relay: publishes committed outbox rows to RabbitMQ, confirmed, then deletes them.

Fast path: a session that wrote an outbox row wakes the relay when it commits, so an event
leaves within milliseconds of its 201. Slow path: the relay also polls, which picks up rows a
broker outage left behind (and rows another replica's notification did not reach).

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` in batches, published concurrently with
publisher confirms and ``mandatory`` (an unroutable message is an error, not a silent drop), and
deleted in the same transaction once confirmed. A row the broker refuses is retried later with
a growing pause; while the broker is unreachable nothing is claimed and nothing is lost. A crash
between the confirm and the delete publishes the row again: consumers deduplicate by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import timedelta

from aiormq.exceptions import DeliveryError, PublishError
from faststream.rabbit import RabbitBroker
from opentelemetry import context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from campaign_service.metrics import CampaignMetrics
from campaign_service.outbox.repository import PENDING_FLAG, OutboxRepository
from campaign_service.settings import CampaignServiceSettings
from shared.messaging import publish_confirmed
from shared.models import OutboxMessage
from shared.telemetry import context_from

logger = logging.getLogger(__name__)

# The broker answered and refused this message: retry the row later. Anything else (a timeout,
# a dropped connection) means the broker is unavailable: leave the rows for the next pass.
_REFUSED = (DeliveryError, PublishError)


class OutboxRelay:
    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        broker: RabbitBroker,
        settings: CampaignServiceSettings,
        metrics: CampaignMetrics,
    ) -> None:
        self._metrics = metrics
        self._sessionmaker = sessionmaker
        self._broker = broker
        self._batch_size = settings.outbox_batch_size
        self._poll_interval = settings.outbox_poll_interval_seconds
        self._publish_timeout = settings.outbox_publish_timeout_seconds
        self._max_backoff = settings.outbox_max_backoff_seconds
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        self._wake.set()

    def session_class(self) -> type[Session]:
        """A session class whose commit wakes this relay when the transaction wrote a row."""

        class OutboxNotifyingSession(Session):
            pass

        def after_commit(session: Session) -> None:
            if session.info.pop(PENDING_FLAG, False):
                self.notify()

        def after_rollback(session: Session) -> None:
            session.info.pop(PENDING_FLAG, None)

        event.listen(OutboxNotifyingSession, "after_commit", after_commit)
        event.listen(OutboxNotifyingSession, "after_rollback", after_rollback)
        return OutboxNotifyingSession

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Finish the pass under way (so a confirmed row is also deleted), publish what is still
        due, then stop; whatever is left after ``grace_seconds`` stays for the next start."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, grace_seconds)
            except TimeoutError:
                logger.warning("outbox relay did not stop in time; cancelled")

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            await self._pass()
        await self._pass()  # rows committed while stopping

    async def _pass(self) -> None:
        try:
            await self.drain()
        except Exception:  # the database may be away; the next pass tries again
            logger.exception("outbox relay pass failed")

    async def drain(self) -> int:
        """Publish due rows until none are left or the broker stops answering."""
        published = 0
        while await self._broker.ping(timeout=0.05):
            claimed, sent, broker_away = await self.publish_batch()
            published += sent
            if broker_away or claimed < self._batch_size:
                break
        return published

    async def publish_batch(self) -> tuple[int, int, bool]:
        """One transaction: claim, publish, delete what was confirmed.

        Returns (rows claimed, rows published, whether the broker was unavailable).
        """
        # The relay's own queries are housekeeping, not part of any campaign's trace.
        with suppress_instrumentation():
            async with self._sessionmaker() as session, session.begin():
                outbox = OutboxRepository(session)
                rows = await outbox.claim(self._batch_size)
                if not rows:
                    return 0, 0, False
                results = await asyncio.gather(
                    *(self._publish(row) for row in rows), return_exceptions=True
                )
                confirmed = [
                    row.id for row, result in zip(rows, results, strict=True) if result is None
                ]
                await self._reschedule_refused(outbox, rows, results)
                if confirmed:
                    await outbox.delete(confirmed)
        self._metrics.outbox_published.inc(len(confirmed))
        broker_away = any(
            isinstance(result, BaseException) and not isinstance(result, _REFUSED)
            for result in results
        )
        if broker_away:
            logger.warning(
                "broker unavailable; outbox rows kept for the next pass",
                extra={"claimed": len(rows), "published": len(confirmed)},
            )
        return len(rows), len(confirmed), broker_away

    async def _reschedule_refused(
        self,
        outbox: OutboxRepository,
        rows: Sequence[OutboxMessage],
        results: Sequence[BaseException | None],
    ) -> None:
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, _REFUSED):
                self._metrics.outbox_refused.inc()
                delay = min(2.0 ** min(row.attempts, 16), self._max_backoff)
                logger.error(
                    "broker refused an outbox message; retrying later",
                    extra={
                        "event_id": str(row.id),
                        "error": repr(result),
                        "retry_in_seconds": delay,
                    },
                )
                await outbox.reschedule(row.id, error=repr(result), delay=timedelta(seconds=delay))

    async def _publish(self, row: OutboxMessage) -> None:
        # In the trace of the request that wrote the row (each publish runs in its own task).
        context.attach(context_from(row.headers))
        await publish_confirmed(
            self._broker,
            row.payload,
            exchange=row.exchange,
            routing_key=row.routing_key,
            confirm_seconds=self._publish_timeout,
            message_id=str(row.id),
            message_type=row.routing_key,
            headers=dict(row.headers),
            content_type="application/json",
        )
