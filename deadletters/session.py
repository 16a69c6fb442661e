"""A session on ``campaign.deadletter``: read it without disturbing it, take messages out.

The session reads the queue from its head with ``basic.get`` on a channel of its own, holding
each message unacknowledged. Nothing read is removed unless the session acknowledges it (after a
replay's publish is confirmed, after a purge's rows are committed); when the session ends, its
channel closes and the broker puts every message still held back where it was, in its order.
A crash at any point therefore duplicates at worst (a replay published, its original not yet
removed), and never loses a message.

On RabbitMQ 4 a message returned by a closing channel is not counted as a delivery; RabbitMQ 3
counts it in ``x-delivery-count``, against the dead-letter queue's limit of a million
(``shared.messaging.DEAD_LETTER_DELIVERY_LIMIT``), which no operator reaches. RabbitMQ 3 also
puts returned messages at the back of the queue: the order is kept because a session reads the
whole queue, up to ``DEADLETTERS_SCAN_MAX`` messages (past that, the ones read go behind the
rest, and the tool says so).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity
from faststream.rabbit import RabbitBroker
from opentelemetry import context, propagate
from sqlalchemy import bindparam, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.types import Integer, String, Uuid

from deadletters.letters import DeadLetter, Selection
from shared.db import values_refused
from shared.logs import log_context
from shared.messaging import (
    ATTEMPT_HEADER,
    ATTEMPT_LIMIT,
    DEAD_LETTER_MARK_HEADER,
    DEAD_LETTER_QUEUE,
    ERROR_MESSAGE_HEADER,
    ERROR_TYPE_HEADER,
    WORKER_QUEUE_NAME,
    publish_copy,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Held:
    """A message read and held by the session, and what it says."""

    message: AbstractIncomingMessage
    letter: DeadLetter


@dataclass(frozen=True, slots=True)
class Scan:
    matching: list[Held]
    scanned: int
    complete: bool  # False: stopped at the scan limit, more wait behind


class QueueMissing(Exception):
    """``campaign.deadletter`` does not exist on the broker's vhost."""


class DeadLetterSession:
    def __init__(self, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self._channel = channel
        self._queue = queue

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, broker: RabbitBroker) -> AsyncIterator[DeadLetterSession]:
        """A session on a channel of the broker's connection; ``campaign.deadletter`` must
        exist (it is looked up, never declared: listing changes nothing)."""
        connection = await broker.connect()
        channel = await connection.channel(publisher_confirms=False)
        try:
            try:
                queue = await channel.get_queue(DEAD_LETTER_QUEUE.name, ensure=True)
            except ChannelNotFoundEntity as exc:
                raise QueueMissing(DEAD_LETTER_QUEUE.name) from exc
            yield cls(channel, queue)
        finally:
            # Every message still held goes back to the queue, in its place.
            with contextlib.suppress(Exception):
                await channel.close()

    async def scan(self, selection: Selection, *, scan_max: int, limit: int | None) -> Scan:
        """Read from the head until the queue has nothing more ready or ``scan_max`` messages
        have been read; every message read stays held. The first ``limit`` that match are the
        scan's.

        The whole queue is read even when ``limit`` are found: RabbitMQ 3 puts a returned
        message at the back of a quorum queue, so only a session that holds every message
        gives them all back in their order."""
        matching: list[Held] = []
        scanned = 0
        while scanned < scan_max:
            message = await self._queue.get(no_ack=False, fail=False)
            if message is None:
                return Scan(matching, scanned, complete=True)
            scanned += 1
            letter = DeadLetter.read(message)
            if selection.matches(letter) and (limit is None or len(matching) < limit):
                matching.append(Held(message, letter))
        return Scan(matching, scanned, complete=False)


def replay_headers(letter: DeadLetter) -> dict[str, Any]:
    """The worker's headers, made again from what the dead letter says (bounded, of the types
    the worker writes: a header of any other type or size is not sent on), marked as
    dead-lettered: in the worker's queue, a replay (a new round of attempts), whoever
    dead-lettered it (the worker, or the broker at the delivery limit). Not the broker's
    ``x-death``, nor the old trace context (the replay's publish span continues the trace)."""
    return {
        ATTEMPT_HEADER: min(max(letter.attempts or 1, 1), ATTEMPT_LIMIT + 1),
        ERROR_TYPE_HEADER: letter.error_type or "",
        ERROR_MESSAGE_HEADER: letter.error_message or "",
        DEAD_LETTER_MARK_HEADER: True,
    }


def _trace_context(message: AbstractIncomingMessage) -> context.Context:
    try:
        return propagate.extract(message.headers)
    except Exception:  # a traceparent that is not text: the replay starts a trace of its own
        return context.Context()


async def replay(
    held: Sequence[Held],
    *,
    broker: RabbitBroker,
    confirm_seconds: float,
    on_replayed: Callable[[DeadLetter], None] = lambda _: None,
) -> int:
    """Send each message back to ``worker.campaign.created`` (confirmed), then remove it from
    the dead-letter queue; in order, one at a time, stopping at the first failure. Returns how
    many were replayed."""
    replayed = 0
    for item in held:
        message, letter = item.message, item.letter
        token = context.attach(_trace_context(message))
        try:
            with log_context(
                event_id=letter.event_id,
                tenant_id=letter.tenant_id,
                campaign_id=letter.campaign_id,
                message_id=letter.message_id,
            ):
                await publish_copy(
                    broker,
                    message,
                    routing_key=WORKER_QUEUE_NAME,
                    headers=replay_headers(letter),
                    confirm_seconds=confirm_seconds,
                )
                await message.ack()
                # In the campaign's trace (trace_id on the line): the trace goes on from here.
                logger.info("dead letter replayed", extra={"attempts": letter.attempts})
        finally:
            context.detach(token)
        replayed += 1
        on_replayed(letter)
    return replayed


@dataclass(frozen=True, slots=True)
class Purged:
    removed: int
    # Events that got a `failed` row with the reason "purged"; the others had a final row
    # already, or are not a valid event of a campaign of their tenant (nothing to record).
    recorded: int


# A `failed` row for a purged event of a campaign of its own tenant, unless the event already
# has a final row: a `success`, or the `failed` of its last round (a round that ended at the
# broker's delivery limit has none: the purge gives it one).
_RECORD_PURGED = text(
    """
    INSERT INTO campaign_job_logs
        (campaign_id, tenant_id, event_id, status, payload, attempts, last_error)
    SELECT c.id, c.tenant_id, :event_id, 'failed', CAST(:payload AS jsonb), :attempts, 'purged'
    FROM campaigns AS c
    WHERE c.id = :campaign_id AND c.tenant_id = :tenant_id
      AND NOT EXISTS (
          SELECT 1 FROM campaign_job_logs AS l
          WHERE l.event_id = :event_id
            AND (l.status = 'success' OR (l.status = 'failed' AND l.attempts >= :attempts))
      )
    ON CONFLICT DO NOTHING
    """
).bindparams(
    bindparam("event_id", type_=Uuid()),
    bindparam("campaign_id", type_=Uuid()),
    bindparam("tenant_id", type_=String()),
    bindparam("payload", type_=String()),
    bindparam("attempts", type_=Integer()),
)


async def purge(
    held: Sequence[Held],
    *,
    engine: AsyncEngine,
    on_purged: Callable[[DeadLetter], None] = lambda _: None,
) -> Purged:
    """Record the purged events (one transaction), then remove their messages. An event whose
    values the database refuses (a NUL character in its name, say) is removed unrecorded, as a
    body that is no event is."""
    recorded = 0
    async with engine.begin() as connection:
        for item in held:
            event = item.letter.event
            if event is None:
                continue
            try:
                async with connection.begin_nested():
                    result = await connection.execute(
                        _RECORD_PURGED,
                        {
                            "event_id": event.event_id,
                            "campaign_id": event.campaign_id,
                            "tenant_id": event.tenant_id,
                            "payload": event.model_dump_json(),
                            "attempts": min(max(item.letter.attempts or 1, 1), ATTEMPT_LIMIT),
                        },
                    )
            except DBAPIError as exc:
                if not values_refused(exc):
                    raise
                logger.warning(
                    "the database refuses this event's values; purged without a row",
                    extra={"event_id": item.letter.event_id, "error": repr(exc.orig)},
                )
                continue
            recorded += result.rowcount
    for item in held:
        await item.message.ack()
        on_purged(item.letter)
    return Purged(removed=len(held), recorded=recorded)
