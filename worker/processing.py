"""What the worker does with one ``campaign.created`` delivery. Every path settles the message
explicitly, and only after its row is written:

- success: row ``success`` -> ack;
- failure with attempts left: row ``retry`` -> republish to the delay queue of that attempt
  (confirmed) with the next attempt number in ``x-attempt`` -> ack;
- failure on the last attempt: row ``failed`` -> dead-letter;
- poison (not a valid event, or no such campaign in its tenant): dead-letter at once, without
  executing anything;
- an event whose ``success`` row exists: ack without running it again.

Dead-lettering with the reason attached: a nack cannot add headers, so the worker republishes
the message (same body, ``message_id`` and properties) to its own queue with the error's type
and message, the attempt count and a mark, acks the original, and rejects the marked copy when it
arrives. The broker dead-letters that copy to ``campaign.deadletter``, adding ``x-death``.

The attempt count lives in ``x-attempt``; the broker's ``x-death`` is never copied onto a
republished message (a broker drops a message it takes for a dead-letter cycle).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faststream.rabbit import RabbitBroker
from faststream.rabbit.message import RabbitMessage
from opentelemetry import trace
from pydantic import ValidationError

from shared.events import CampaignCreated
from shared.logs import log_context
from shared.messaging import (
    ATTEMPT_HEADER,
    DEAD_LETTER_MARK_HEADER,
    ERROR_MESSAGE_HEADER,
    ERROR_TYPE_HEADER,
    WORKER_QUEUE_NAME,
    publish_confirmed,
    retry_queue,
)
from shared.models import JobStatus
from shared.telemetry import current_trace_id
from worker.metrics import Outcome, WorkerMetrics
from worker.settings import WorkerSettings
from worker.simulation import execute
from worker.store import JobLogStore, Recorded, ShuttingDown, Standing

logger = logging.getLogger(__name__)

_ERROR_MESSAGE_LIMIT = 1000


class PoisonMessage(Exception):
    """A message that no number of attempts can process."""


def attempt_of(headers: dict[str, Any]) -> int:
    value = headers.get(ATTEMPT_HEADER, 1)
    try:
        attempt = int(value)
    except (TypeError, ValueError):
        return 1
    return max(attempt, 1)


def describe(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)[:_ERROR_MESSAGE_LIMIT]


class CampaignProcessor:
    def __init__(
        self,
        *,
        broker: RabbitBroker,
        store: JobLogStore,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        stopping: asyncio.Event,
    ) -> None:
        self._metrics = metrics
        self._broker = broker
        self._store = store
        self._settings = settings
        self._stopping = stopping
        self._slots = asyncio.Semaphore(settings.concurrency)

    async def handle(self, message: RabbitMessage) -> None:
        span = trace.get_current_span()  # the process span of FastStream's telemetry middleware
        async with self._slots:
            if self._stopping.is_set():
                # Prefetched but not started when the worker was told to stop: give it back.
                await self._requeue(message, "worker stopping")
                self._metrics.messages.labels(Outcome.REQUEUED.value).inc()
                return
            if message.headers.get(DEAD_LETTER_MARK_HEADER):
                # Our own copy, carrying the final error: the broker moves it to the DLX.
                await message.reject(requeue=False)
                self._metrics.dead_lettered.inc()
                span.add_event(
                    "dead-lettered", {"messaging.destination.name": "campaign.deadletter"}
                )
                return
            self._metrics.in_flight.inc()
            try:
                with self._metrics.processing_duration.time():
                    outcome = await self._settle(message)
            finally:
                self._metrics.in_flight.dec()
            self._metrics.messages.labels(outcome.value).inc()
            span.set_attribute("campaign.outcome", outcome.value)

    async def _settle(self, message: RabbitMessage) -> Outcome:
        try:
            return await self._handle(message)
        except ShuttingDown:
            await self._requeue(message, "worker stopping")
        except Exception:
            # Unexpected (a bug, a publish that failed): give the message back, after a pause
            # so a persistent fault does not spin. The queue's delivery limit dead-letters a
            # message that keeps failing this way: the give-back counts as a failed delivery.
            logger.exception("processing failed unexpectedly; requeueing")
            await asyncio.sleep(1.0)
            await self._requeue(message, "unexpected error", failed=True)
        return Outcome.REQUEUED

    async def _handle(self, message: RabbitMessage) -> Outcome:
        attempt = attempt_of(message.headers)
        try:
            event = CampaignCreated.model_validate_json(message.body)
        except ValidationError as exc:
            logger.error(
                "malformed message dead-lettered",
                extra={"message_id": message.message_id, "error": describe(exc)[1]},
            )
            await self._dead_letter(message, attempt, PoisonMessage(str(exc)))
            return Outcome.POISON
        trace.get_current_span().set_attributes(
            {
                "campaign.id": str(event.campaign_id),
                "campaign.event_id": str(event.event_id),
                "campaign.attempt": attempt,
                "tenant.id": event.tenant_id,
            }
        )
        # Every line logged while this event is handled carries its ids.
        with log_context(
            tenant_id=event.tenant_id,
            campaign_id=str(event.campaign_id),
            event_id=str(event.event_id),
            attempt=attempt,
        ):
            return await self._process(message, event, attempt)

    async def _process(
        self, message: RabbitMessage, event: CampaignCreated, attempt: int
    ) -> Outcome:
        standing = await self._store.standing(event)
        if standing is Standing.DONE:
            logger.info("event already processed; acknowledged")
            await message.ack()
            return Outcome.DUPLICATE
        if standing is Standing.UNKNOWN_CAMPAIGN:
            return await self._unknown_campaign(message, attempt)

        try:
            await execute(
                event, attempt=attempt, work_seconds=self._settings.worker_simulated_work_seconds
            )
        except Exception as exc:  # the campaign's execution failed, whatever the reason
            return await self._failed(message, event, attempt, exc)

        recorded = await self._store.record(
            event, status=JobStatus.SUCCESS, attempt=attempt, trace_id=current_trace_id()
        )
        if recorded is Recorded.UNKNOWN_CAMPAIGN:
            return await self._unknown_campaign(message, attempt)
        await message.ack()
        redelivered = {"redelivered": message.raw_message.redelivered}
        if recorded is Recorded.ALREADY_THERE:
            logger.info("event processed by another delivery; acknowledged", extra=redelivered)
            return Outcome.DUPLICATE
        logger.info("campaign executed", extra=redelivered)
        return Outcome.SUCCESS

    async def _failed(
        self,
        message: RabbitMessage,
        event: CampaignCreated,
        attempt: int,
        error: Exception,
    ) -> Outcome:
        error_type, error_message = describe(error)
        last_attempt = attempt >= self._settings.worker_max_attempts
        status = JobStatus.FAILED if last_attempt else JobStatus.RETRY
        recorded = await self._store.record(
            event,
            status=status,
            attempt=attempt,
            last_error=f"{error_type}: {error_message}",
            trace_id=current_trace_id(),
        )
        if recorded is Recorded.UNKNOWN_CAMPAIGN:
            return await self._unknown_campaign(message, attempt)
        if last_attempt:
            logger.warning("campaign failed on its last attempt; dead-lettering")
            await self._dead_letter(message, attempt, error)
            return Outcome.FAILED
        delay = self._settings.retry_delay(attempt)
        logger.info(
            "campaign failed; retrying",
            extra={"retry_in_seconds": delay, "error": error_message},
        )
        await self._republish(
            message,
            routing_key=retry_queue(delay).name,
            headers={
                ATTEMPT_HEADER: attempt + 1,
                ERROR_TYPE_HEADER: error_type,
                ERROR_MESSAGE_HEADER: error_message,
            },
        )
        await message.ack()
        return Outcome.RETRY

    async def _unknown_campaign(self, message: RabbitMessage, attempt: int) -> Outcome:
        logger.error("event names no campaign of its tenant; dead-lettering")
        await self._dead_letter(
            message, attempt, PoisonMessage("no such campaign in the event's tenant")
        )
        return Outcome.POISON

    async def _dead_letter(self, message: RabbitMessage, attempt: int, error: Exception) -> None:
        error_type, error_message = describe(error)
        trace.get_current_span().add_event(
            "dead-letter requested", {"error.type": error_type, "campaign.attempt": attempt}
        )
        await self._republish(
            message,
            routing_key=WORKER_QUEUE_NAME,
            headers={
                ATTEMPT_HEADER: attempt,
                ERROR_TYPE_HEADER: error_type,
                ERROR_MESSAGE_HEADER: error_message,
                DEAD_LETTER_MARK_HEADER: True,
            },
        )
        await message.ack()

    async def _republish(
        self, message: RabbitMessage, *, routing_key: str, headers: dict[str, Any]
    ) -> None:
        """A copy of ``message`` through the default exchange (straight to one queue), confirmed.

        Only our own headers travel: never the broker's ``x-death`` or ``x-delivery-count``.
        """
        raw = message.raw_message
        await publish_confirmed(
            self._broker,
            message.body,
            exchange="",
            routing_key=routing_key,
            confirm_seconds=self._settings.worker_publish_timeout_seconds,
            message_id=raw.message_id,
            correlation_id=raw.correlation_id,
            message_type=raw.type,
            content_type=raw.content_type,
            content_encoding=raw.content_encoding,
            timestamp=raw.timestamp,
            headers=headers,
        )

    async def _requeue(self, message: RabbitMessage, reason: str, *, failed: bool = False) -> None:
        """Give a delivery back to the queue. RabbitMQ (4.3 and later) counts a ``reject``
        against the quorum queue's delivery limit and a ``nack`` not: a message handed back by a
        stopping worker keeps its deliveries, one that failed spends one."""
        try:
            if failed:
                await message.reject(requeue=True)
            else:
                await message.nack(requeue=True)
        except Exception as exc:  # the channel is gone: the broker redelivers the message anyway
            logger.warning(
                "could not requeue; the broker will redeliver",
                extra={"reason": reason, "error": repr(exc)},
            )
