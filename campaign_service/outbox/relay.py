"""The outbox relay: publishes committed outbox rows to RabbitMQ, confirmed, then deletes them.

Fast path: a request's session hands the messages it wrote to the relay when it commits
(:meth:`OutboxRelay.session_class`; what a rollback or a rolled-back savepoint wrote is
dropped), and the relay publishes them at once, from memory. Their rows are deleted together,
by one statement for every batch's worth of confirmed messages or every
``_DELETE_LINGER_SECONDS``, whichever comes first (and when the relay stops): a round trip to
the database costs a process more than the statement, and at a steady trickle of campaigns
there would otherwise be one for every campaign. No row is read back, and no transaction is
held open while the broker confirms: an event leaves within milliseconds of its 201, at the
cost of one publish and a share of one DELETE.

Slow path: the relay also polls the table, claiming due rows with ``FOR UPDATE SKIP LOCKED``
in batches, publishing them and deleting them in the same transaction once confirmed. A row
the fast path owns becomes due only after ``OUTBOX_CLAIM_AFTER_SECONDS``, so a poll takes just
what the fast path could not publish: rows of a broker outage (the fast path drops what it
holds while the broker is away), of a process that stopped before publishing, of a refusal, of
another replica. The fast path leaves to the poll a message it did not get to within half that
time (after a long drain, say), so the two do not publish one row at the same time. A row the
broker refuses is retried later with a growing pause; while the broker is unreachable nothing
is claimed and nothing is lost.

Every publish is confirmed and ``mandatory`` (an unroutable message is an error, not a silent
drop). A crash or a database blink between a confirm and its delete publishes the row again
later (at most ``_DELETE_LINGER_SECONDS`` of confirmed rows wait for their delete):
consumers deduplicate by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from aio_pika.exceptions import ChannelNotFoundEntity, DeliveryError, PublishError
from faststream.rabbit import RabbitBroker
from opentelemetry import context, propagate
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, SessionTransaction

from campaign_service.metrics import CampaignMetrics
from campaign_service.outbox.repository import HANDOVER, Handover, OutboxRepository, Outgoing
from campaign_service.settings import CampaignServiceSettings
from shared.db import create_sessionmaker
from shared.messaging import publish_confirmed

logger = logging.getLogger(__name__)

# The broker answered and refused this message (unroutable, or its exchange does not exist):
# retry the row later. Anything else (a timeout, a dropped connection) means the broker is
# unavailable: leave the rows for the next pass.
_REFUSED = (DeliveryError, PublishError, ChannelNotFoundEntity)
# How long the rows of confirmed fast-path messages may wait to be deleted together (at most a
# quarter of the claim window, OUTBOX_CLAIM_AFTER_SECONDS, so the poll does not take them again).
_DELETE_LINGER_SECONDS = 0.2
# Under overload every commit overflows the hand-over: one warning line per this many seconds
# (with the rows left to the poll since the last), not one per request.
_OVERFLOW_LOG_SECONDS = 10.0


class OutboxRelay:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        broker: RabbitBroker,
        settings: CampaignServiceSettings,
        publishers: Sequence[RabbitBroker] = (),
        metrics: CampaignMetrics,
    ) -> None:
        self._metrics = metrics
        self._sessionmaker = create_sessionmaker(engine)
        # The fast path's deletes: one statement each, in no transaction of its own.
        self._autocommit = create_sessionmaker(
            engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._broker = broker
        # Publishes go round the brokers (connections), so that they do not queue on one
        # channel; the first is ``broker`` itself, whose connection the relay checks.
        self._publishers = [broker, *publishers]
        self._next_publisher = 0
        self._batch_size = settings.outbox_batch_size
        self._poll_interval = settings.outbox_poll_interval_seconds
        self._claim_after = timedelta(seconds=settings.outbox_claim_after_seconds)
        self._publish_timeout = settings.outbox_publish_timeout_seconds
        self._max_backoff = settings.outbox_max_backoff_seconds
        # Handed over (when, what) and not yet published; beyond this many, rows wait for the
        # poll instead. A message handed over more than half the claim window ago is left to
        # the poll too: it may be taking its row already (after a long drain, say).
        self._ready: list[tuple[float, Outgoing]] = []
        self._ready_max = 10 * settings.outbox_batch_size
        self._fresh_seconds = settings.outbox_claim_after_seconds / 2
        self._overflow = 0  # rows left to the poll since the last warning
        self._overflow_logged = -_OVERFLOW_LOG_SECONDS
        self._behind = 0  # rows the fast path got to too late, since the last warning
        self._behind_logged = -_OVERFLOW_LOG_SECONDS
        # Rows of confirmed fast-path messages, and when the first of them must be deleted.
        self._published: list[uuid.UUID] = []
        self._delete_due = 0.0
        self._delete_linger = min(_DELETE_LINGER_SECONDS, settings.outbox_claim_after_seconds / 4)
        self._wake = asyncio.Event()
        self._poll_now = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Look at the table now, not at the next poll."""
        self._poll_now = True
        self._wake.set()

    def hand_over(self, messages: Sequence[Outgoing]) -> None:
        """Messages whose rows have just been committed: published at once."""
        if not messages:
            return
        now = time.monotonic()
        room = self._ready_max - len(self._ready)
        self._ready.extend((now, message) for message in messages[:room])
        self._overflow += max(len(messages) - room, 0)
        self._report_overflow(now)
        self._wake.set()

    def _report_overflow(self, now: float) -> None:
        if self._overflow and now >= self._overflow_logged + _OVERFLOW_LOG_SECONDS:
            logger.warning(
                "outbox hand-over full; rows left to the poll",
                extra={"rows": self._overflow},
            )
            self._overflow, self._overflow_logged = 0, now

    def _report_behind(self, now: float) -> None:
        if self._behind and now >= self._behind_logged + _OVERFLOW_LOG_SECONDS:
            logger.warning(
                "outbox fast path behind; rows left to the poll",
                extra={"rows": self._behind, "after_seconds": self._fresh_seconds},
            )
            self._behind, self._behind_logged = 0, now

    def session_class(self) -> type[Session]:
        """A session class whose commits hand this relay the outbox messages they wrote."""
        relay = self
        claim_after = self._claim_after

        class OutboxHandoverSession(Session):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.info[HANDOVER] = Handover(claim_after)

        def after_commit(session: Session) -> None:
            if not session.in_nested_transaction():  # a savepoint released commits nothing yet
                relay.hand_over(session.info[HANDOVER].committed())

        def after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
            session.info[HANDOVER].rolled_back(previous)

        def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
            if transaction.parent is None:  # ended without a commit (closed): nothing to send
                session.info[HANDOVER].staged.clear()

        event.listen(OutboxHandoverSession, "after_commit", after_commit)
        event.listen(OutboxHandoverSession, "after_soft_rollback", after_soft_rollback)
        event.listen(OutboxHandoverSession, "after_transaction_end", after_transaction_end)
        return OutboxHandoverSession

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Finish the pass under way (so a confirmed row is also deleted), publish what is still
        handed over or due, then stop; whatever is left after ``grace_seconds`` stays for the
        next start (or another replica)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, grace_seconds)
            except TimeoutError:
                logger.warning("outbox relay did not stop in time; cancelled")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while not self._stopping:
            wake_at = min(next_poll, self._delete_due) if self._published else next_poll
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(wake_at):
                    await self._wake.wait()
            self._wake.clear()
            await self._guarded(self.publish_handed_over)
            await self._guarded(self.delete_published)
            if self._poll_now or loop.time() >= next_poll:
                self._poll_now = False
                await self._guarded(self.drain)
                next_poll = loop.time() + self._poll_interval
        # What was committed while stopping, and the rows of everything published.
        await self._guarded(self.publish_handed_over)
        await self._guarded(functools.partial(self.delete_published, now=True))
        await self._guarded(self.drain)

    async def _guarded(self, step: Callable[[], Awaitable[int]]) -> None:
        try:
            await step()
        except Exception:  # the database may be away; the next pass tries again
            logger.exception("outbox relay pass failed")

    async def publish_handed_over(self) -> int:
        """Publish the messages committed in this process so far (what is handed over
        meanwhile waits for the next call: the poll gets its turn in between); their rows are
        deleted by :meth:`delete_published`. What cannot be published now (the broker away, or
        refusing) is left to the poll."""
        taken, self._ready = self._ready, []
        self._report_overflow(time.monotonic())  # what overflowed since the last line, if due
        loop = asyncio.get_running_loop()
        published = 0
        for start in range(0, len(taken), self._batch_size):
            # Fresh as this batch starts, not as the pass did: with slow confirms a pass takes
            # long, and what the poll may take by now is the poll's.
            fresh_since = time.monotonic() - self._fresh_seconds
            chunk = taken[start : start + self._batch_size]
            batch = [m for handed, m in chunk if handed >= fresh_since]
            self._behind += len(chunk) - len(batch)
            self._report_behind(time.monotonic())
            if not batch:
                continue
            if not await self._broker.ping(timeout=0.05):
                logger.warning(
                    "broker unavailable; outbox rows left for the poll",
                    extra={"rows": len(taken) - start},
                )
                break
            results = await self._publish_all(batch)
            unsent: list[BaseException] = []
            for message, result in zip(batch, results, strict=True):
                if isinstance(result, _REFUSED):
                    self._refused(message.id, result, "the poll retries it")
                elif result is not None:
                    unsent.append(result)
            if unsent:
                logger.warning(
                    "outbox messages not published; the poll retries them",
                    extra={"rows": len(unsent), "error": repr(unsent[0])},
                )
            confirmed = [m.id for m, result in zip(batch, results, strict=True) if result is None]
            if confirmed:
                # Published: counted now, whatever happens to the delete.
                self._metrics.outbox_published.inc(len(confirmed))
                if not self._published:
                    self._delete_due = loop.time() + self._delete_linger
                self._published.extend(confirmed)
            published += len(confirmed)
            if self._published and loop.time() >= self._delete_due:
                # Confirmed rows wait no longer than their linger, however long the pass.
                await self._guarded(functools.partial(self.delete_published, now=True))
        return published

    async def delete_published(self, *, now: bool = False) -> int:
        """Delete the rows of the fast path's confirmed messages, with one statement, once a
        batch's worth waits or the first has waited its linger (or ``now``).
        Rows a failed delete misses are published again by the poll, and the duplicates
        dropped by the consumers."""
        due = asyncio.get_running_loop().time() >= self._delete_due
        if not self._published or not (now or due or len(self._published) >= self._batch_size):
            return 0
        ids, self._published = self._published, []
        with suppress_instrumentation():  # housekeeping, not part of any campaign's trace
            async with self._autocommit() as session:
                await OutboxRepository(session).delete(ids)
        return len(ids)

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
                results = await self._publish_all([message for message, _ in rows])
                confirmed = [
                    message.id
                    for (message, _), result in zip(rows, results, strict=True)
                    if result is None
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
        rows: Sequence[tuple[Outgoing, int]],
        results: Sequence[BaseException | None],
    ) -> None:
        for (message, attempts), result in zip(rows, results, strict=True):
            if isinstance(result, _REFUSED):
                delay = min(2.0 ** min(attempts, 16), self._max_backoff)
                self._refused(message.id, result, f"retrying in {delay:g} s")
                await outbox.reschedule(
                    message.id, error=repr(result), delay=timedelta(seconds=delay)
                )

    def _refused(self, message_id: uuid.UUID, error: BaseException, then: str) -> None:
        self._metrics.outbox_refused.inc()
        logger.error(
            f"broker refused an outbox message; {then}",
            extra={"event_id": str(message_id), "error": repr(error)},
        )

    async def _publish_all(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        return await asyncio.gather(
            *(self._publish(message) for message in messages), return_exceptions=True
        )

    async def _publish(self, message: Outgoing) -> None:
        # In the trace of the request that wrote the row (each publish runs in its own task).
        token = context.attach(propagate.extract(message.headers))
        try:
            publisher = self._publishers[self._next_publisher]
            self._next_publisher = (self._next_publisher + 1) % len(self._publishers)
            await publish_confirmed(
                publisher,
                message.payload,
                exchange=message.exchange,
                routing_key=message.routing_key,
                confirm_seconds=self._publish_timeout,
                message_id=str(message.id),
                message_type=message.routing_key,
                headers=dict(message.headers),  # the middleware writes the publish span's context
            )
        finally:
            context.detach(token)
