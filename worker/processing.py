"""What the worker does with a batch of ``campaign.created`` deliveries. Every delivery is
settled explicitly, and only after its row is written:

- success: row ``success`` -> ack;
- failure with attempts left in its round: row ``retry`` -> republish to the delay queue of that
  attempt (confirmed) with the next attempt number in ``x-attempt`` -> ack;
- failure on the last attempt of its round: row ``failed`` -> dead-letter;
- poison (not a valid event, or no such campaign in its tenant): dead-letter at once, without
  executing anything;
- an event whose ``success`` row exists: ack without running it again.

A batch costs one query before execution (which events are done, which name no campaign of
their tenant), one insert after it for all its rows, and one ``basic.ack(multiple=True)``: the
consumer hands over batches in delivery order, one at a time, and every delivery the batch does
not acknowledge (requeued) is settled before that ack, so the ack covers exactly the batch's own
acknowledged deliveries.

Dead-lettering with the reason attached: a nack cannot add headers, so the worker publishes a
copy (same body, ``message_id`` and properties) to ``worker.campaign.created.dead-letter`` with
the error's type and message, the attempt count and the dead-letter mark, confirmed, and acks
the original. That queue expires every message at once into ``campaign.deadletter``, which adds
``x-death``.

Replays: a message arriving here with the dead-letter mark, or with the broker's record of a
death into ``campaign.deadletter``, was sent back by an operator (``deadletters replay``, or the
RabbitMQ UI's "Move messages"). It starts a new round of ``WORKER_MAX_ATTEMPTS`` attempts,
numbered on from the attempt it died at, so its rows continue the campaign's job log; an event
that already succeeded is acknowledged unrun. A copy marked by an earlier version for rejection
(and not yet dead) is rejected as that version would have.

The attempt count lives in ``x-attempt``, the round's first attempt in ``x-round-first-attempt``;
the broker's ``x-death`` is never copied onto a republished message (a broker drops a message it
takes for a dead-letter cycle).

Each delivery has its own process span, a child of the publish span whose W3C context came in
the AMQP headers, so one trace follows each campaign (a replay too); every line logged for a
delivery carries its trace and its ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage as Message
from aio_pika.exceptions import ChannelInvalidStateError
from faststream.opentelemetry.consts import MESSAGING_DESTINATION_PUBLISH_NAME
from faststream.rabbit import RabbitBroker
from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.semconv.trace import SpanAttributes
from pydantic import ValidationError

from shared.events import CampaignCreated
from shared.logs import log_context, trace_fields
from shared.messaging import (
    ATTEMPT_HEADER,
    ATTEMPT_LIMIT,
    DEAD_LETTER_MARK_HEADER,
    DEAD_LETTER_PARKING_QUEUE,
    ERROR_MESSAGE_HEADER,
    ERROR_TYPE_HEADER,
    LEGACY_DEAD_LETTER_MARK_HEADER,
    ROUND_HEADER,
    died_into_dead_letters,
    publish_copy,
    retry_queue,
)
from shared.models import JobStatus
from worker.metrics import Outcome, WorkerMetrics
from worker.settings import WorkerSettings
from worker.simulation import execute
from worker.store import JobLogStore, JobRow, Recorded, ShuttingDown, Standing

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

_ERROR_MESSAGE_LIMIT = 1000


class PoisonMessage(Exception):
    """A message that no number of attempts can process."""


def _counter(value: Any) -> int:
    """A header's positive count; 1 for anything else, and at most one past ATTEMPT_LIMIT."""
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):  # not a number, or an infinite float
        return 1
    return min(max(count, 1), ATTEMPT_LIMIT + 1)


@dataclass(frozen=True, slots=True)
class Round:
    """Which attempt a delivery is, and the first attempt of its round of attempts."""

    attempt: int
    first: int
    # A dead letter sent back by an operator: the first attempt of a new round.
    replayed: bool = False
    # An earlier version's copy on its way to the dead-letter exchange: rejected, not run.
    legacy_copy: bool = False

    def number(self) -> int:
        """The attempt's place in its round (from 1)."""
        return self.attempt - self.first + 1

    @property
    def out_of_range(self) -> bool:
        return self.attempt > ATTEMPT_LIMIT


def round_of(headers: dict[str, Any]) -> Round:
    attempt = _counter(headers.get(ATTEMPT_HEADER, 1))
    if attempt > ATTEMPT_LIMIT:
        return Round(attempt, attempt)
    if headers.get(DEAD_LETTER_MARK_HEADER) or died_into_dead_letters(headers):
        return Round(attempt + 1, attempt + 1, replayed=True)
    if headers.get(LEGACY_DEAD_LETTER_MARK_HEADER):
        return Round(attempt, attempt, legacy_copy=True)
    return Round(attempt, min(_counter(headers.get(ROUND_HEADER, 1)), attempt))


def describe(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)[:_ERROR_MESSAGE_LIMIT]


def _process_span(message: Message) -> trace.Span:
    """The delivery's process span, named and described as FastStream's telemetry names its
    own (``<exchange>.<routing key> process``), in the trace the publisher started."""
    exchange = message.exchange or "default"
    try:
        parent = propagate.extract(message.headers)
    except Exception:  # a traceparent that is not text (bytes, a number): a trace of its own
        parent = Context()
    return tracer.start_span(
        f"{exchange}.{message.routing_key} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            SpanAttributes.MESSAGING_SYSTEM: "rabbitmq",
            SpanAttributes.MESSAGING_OPERATION: "process",
            SpanAttributes.MESSAGING_MESSAGE_ID: message.message_id or "",
            SpanAttributes.MESSAGING_MESSAGE_PAYLOAD_SIZE_BYTES: len(message.body),
            SpanAttributes.MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY: message.routing_key or "",
            MESSAGING_DESTINATION_PUBLISH_NAME: message.exchange or "",
        },
    )


@dataclass(slots=True, eq=False)
class _Delivery:
    """One delivery of the batch, its span and, once decided, how it is settled."""

    message: Message
    span: trace.Span
    round: Round
    event: CampaignCreated | None = None
    outcome: Outcome | None = None
    error: tuple[str, str] | None = None  # the failure's type and message, to send on
    settled: bool = False
    lines: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    # The event's ids, on every line logged about the delivery (none before it is parsed).
    about: dict[str, Any] = field(default_factory=dict)

    @property
    def attempt(self) -> int:
        return self.round.attempt

    @property
    def trace_id(self) -> str | None:
        context = self.span.get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def log(self, level: int, message: str, **extra: Any) -> None:
        """A line to log for this delivery once the batch is settled, with its trace and ids."""
        self.lines.append((level, message, extra))


def _event(delivery: _Delivery) -> CampaignCreated:
    assert delivery.event is not None, "only valid events get this far"
    return delivery.event


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

    async def handle_batch(self, messages: Sequence[Message]) -> None:
        started = time.perf_counter()
        batch = [
            _Delivery(message, _process_span(message), round_of(message.headers))
            for message in messages
        ]
        self._metrics.in_flight.inc(len(batch))
        try:
            await self._settle(batch)
        finally:
            self._metrics.in_flight.dec(len(batch))
            elapsed = time.perf_counter() - started
            for delivery in batch:
                try:
                    self._finish(delivery, elapsed)
                except Exception:  # settled already: nothing here may give it back again
                    logger.exception("could not log, count or end the span of a delivery")

    async def requeue(self, messages: Sequence[Message], failed: bool) -> None:
        """Give back deliveries no batch settled: prefetched ones when the worker stops, or
        those of a batch that failed outside :meth:`handle_batch`'s own handling (``failed``)."""
        reason = "unexpected error" if failed else "worker stopping"
        for message in messages:
            await _give_back(message, reason, failed=failed)
        self._metrics.outcomes[Outcome.REQUEUED].inc(len(messages))

    async def _settle(self, batch: list[_Delivery]) -> None:
        try:
            if self._stopping.is_set():
                # Prefetched but not started when the worker was told to stop: give it back.
                await self._give_back_all(batch, "worker stopping")
                return
            await self._process(batch)
        except ShuttingDown:
            await self._give_back_all(batch, "worker stopping")
        except Exception:
            # Unexpected (a bug): give the unsettled messages back, after a pause so a
            # persistent fault does not spin. The queue's delivery limit dead-letters
            # a message that keeps failing this way: the give-back counts as a failed delivery.
            logger.exception("processing failed unexpectedly; requeueing")
            await asyncio.sleep(1.0)
            await self._give_back_all(batch, "unexpected error", failed=True)

    async def _process(self, batch: list[_Delivery]) -> None:
        to_check = [delivery for delivery in batch if await self._admit(delivery)]

        standings = await self._store.standings([_event(d) for d in to_check])
        to_execute = []
        for delivery, standing in zip(to_check, standings, strict=True):
            if standing is Standing.DONE:
                delivery.outcome = Outcome.DUPLICATE
                delivery.log(logging.INFO, "event already processed; acknowledged")
            elif standing is Standing.UNKNOWN_CAMPAIGN:
                _unknown_campaign(delivery)
            elif standing is Standing.REFUSED:
                _refused(delivery)
            else:
                to_execute.append(delivery)

        errors = await asyncio.gather(*(self._execute(d) for d in to_execute))
        # Those given back unstarted (the worker stopping) are settled already.
        executed = [(d, e) for d, e in zip(to_execute, errors, strict=True) if not d.settled]
        rows = [self._row(d, error) for d, error in executed]
        if rows:
            recorded = await self._store.record(rows, traces=[d.span for d, _ in executed])
            for (delivery, _), row, outcome in zip(executed, rows, recorded, strict=True):
                self._decide(delivery, row, outcome)

        await self._republish_all([d for d in batch if not d.settled])
        await _ack_all([d for d in batch if not d.settled])

    async def _admit(self, delivery: _Delivery) -> bool:
        """Whether the delivery is an event to check and execute; anything else is settled or
        marked for the dead-letter queue here."""
        message = delivery.message
        try:
            message.channel  # noqa: B018  (raises once the channel is closed)
        except ChannelInvalidStateError:
            # Received before a reconnect: its ack can no longer be sent and the broker
            # delivers it again on the new channel, so doing its work now would do it twice.
            delivery.settled = True
            return False
        if delivery.round.legacy_copy:
            # Dead-lettered by an earlier version, caught in the queue by a deploy: finish its way.
            await _reject(delivery)
            self._metrics.dead_lettered.inc()
            return False
        if delivery.round.out_of_range:
            delivery.outcome = Outcome.POISON
            delivery.error = describe(PoisonMessage(f"{ATTEMPT_HEADER} out of range"))
            delivery.log(logging.ERROR, "attempt number out of range; dead-lettering")
            return False
        if delivery.round.replayed:
            delivery.span.set_attribute("campaign.replay", True)
            delivery.log(
                logging.INFO,
                "dead letter replayed: a new round of attempts",
                message_id=message.message_id,
                attempt=delivery.attempt,
            )
        try:
            event = CampaignCreated.model_validate_json(message.body)
        except ValidationError as exc:
            delivery.outcome = Outcome.POISON
            delivery.error = describe(PoisonMessage(str(exc)))
            delivery.log(
                logging.ERROR,
                "malformed message dead-lettered",
                message_id=message.message_id,
                error=describe(exc)[1],
            )
            return False
        delivery.event = event
        campaign_id, event_id = str(event.campaign_id), str(event.event_id)
        delivery.about = {
            "tenant_id": event.tenant_id,
            "campaign_id": campaign_id,
            "event_id": event_id,
            "attempt": delivery.attempt,
        }
        delivery.span.set_attributes(
            {
                "campaign.id": campaign_id,
                "campaign.event_id": event_id,
                "campaign.attempt": delivery.attempt,
                "tenant.id": event.tenant_id,
            }
        )
        return True

    async def _execute(self, delivery: _Delivery) -> Exception | None:
        """Execute the campaign (in its delivery's trace): its error, or None. A delivery still
        waiting for a slot (``WORKER_CONCURRENCY``) when the worker is told to stop is given
        back instead, not started."""
        async with self._slots:
            if not self._stopping.is_set():
                self._metrics.executing.inc()
                try:
                    with _scope(delivery):
                        await execute(
                            _event(delivery),
                            attempt=delivery.attempt,
                            work_seconds=self._settings.worker_simulated_work_seconds,
                        )
                except Exception as exc:  # the campaign's execution failed, whatever the reason
                    return exc
                finally:
                    self._metrics.executing.dec()
                return None
        await self._give_back_all([delivery], "worker stopping")
        return None

    def _row(self, delivery: _Delivery, error: Exception | None) -> JobRow:
        event = _event(delivery)
        if error is None:
            return JobRow(event, JobStatus.SUCCESS, delivery.attempt, None, delivery.trace_id)
        delivery.error = describe(error)
        last_attempt = delivery.round.number() >= self._settings.worker_max_attempts
        status = JobStatus.FAILED if last_attempt else JobStatus.RETRY
        error_type, error_message = delivery.error
        return JobRow(
            event, status, delivery.attempt, f"{error_type}: {error_message}", delivery.trace_id
        )

    def _decide(self, delivery: _Delivery, row: JobRow, recorded: Recorded) -> None:
        """How a delivery whose row was written (or found) is settled."""
        if recorded is Recorded.UNKNOWN_CAMPAIGN:
            _unknown_campaign(delivery)
        elif recorded is Recorded.REFUSED:
            _refused(delivery)
        elif row.status is JobStatus.SUCCESS:
            redelivered = delivery.message.redelivered
            if recorded is Recorded.ALREADY_THERE:
                delivery.outcome = Outcome.DUPLICATE
                delivery.log(
                    logging.INFO,
                    "event processed by another delivery; acknowledged",
                    redelivered=redelivered,
                )
            else:
                delivery.outcome = Outcome.SUCCESS
                delivery.log(logging.INFO, "campaign executed", redelivered=redelivered)
        elif row.status is JobStatus.FAILED:
            delivery.outcome = Outcome.FAILED
            delivery.log(logging.WARNING, "campaign failed on its last attempt; dead-lettering")
        else:
            delivery.outcome = Outcome.RETRY
            delivery.log(
                logging.INFO,
                "campaign failed; retrying",
                retry_in_seconds=self._settings.retry_delay(delivery.round.number()),
                error=delivery.error[1] if delivery.error else None,
            )

    async def _republish_all(self, batch: list[_Delivery]) -> None:
        """The copies retries and dead letters need, all confirmed before any original is
        acknowledged. An original whose copy could not be sent (the broker refused it, or did
        not confirm in time) is given back instead."""
        copies = [(d, copy) for d in batch if (copy := self._copy(d)) is not None]
        if not copies:
            return
        results = await asyncio.gather(
            *(self._republish(d, *copy) for d, copy in copies), return_exceptions=True
        )
        failed = []
        for (delivery, _), result in zip(copies, results, strict=True):
            if not isinstance(result, BaseException):
                if delivery.outcome is not Outcome.RETRY:
                    self._metrics.dead_lettered.inc()
                    delivery.span.add_event(
                        "dead-lettered", {"messaging.destination.name": "campaign.deadletter"}
                    )
                continue
            delivery.span.record_exception(result)
            delivery.span.set_status(
                trace.Status(trace.StatusCode.ERROR, f"{type(result).__name__}: {result}")
            )
            logger.error(
                "could not republish; requeueing",
                extra={"message_id": delivery.message.message_id, "error": repr(result)},
            )
            failed.append(delivery)
        if failed:
            await asyncio.sleep(1.0)  # a broker that refused just now would refuse again
            await self._give_back_all(failed, "republish failed", failed=True)

    def _copy(self, delivery: _Delivery) -> tuple[str, dict[str, Any]] | None:
        """The queue the delivery's copy goes to, and its headers; None when it needs none."""
        error_type, error_message = delivery.error or ("", "")
        if delivery.outcome is Outcome.RETRY:
            delay = self._settings.retry_delay(delivery.round.number())
            return retry_queue(delay).name, {
                ATTEMPT_HEADER: delivery.attempt + 1,
                ROUND_HEADER: delivery.round.first,
                ERROR_TYPE_HEADER: error_type,
                ERROR_MESSAGE_HEADER: error_message,
            }
        if delivery.outcome in (Outcome.FAILED, Outcome.POISON):
            delivery.span.add_event(
                "dead-letter requested",
                {"error.type": error_type, "campaign.attempt": delivery.attempt},
            )
            return DEAD_LETTER_PARKING_QUEUE.name, {
                ATTEMPT_HEADER: delivery.attempt,
                ROUND_HEADER: delivery.round.first,
                ERROR_TYPE_HEADER: error_type,
                ERROR_MESSAGE_HEADER: error_message,
                DEAD_LETTER_MARK_HEADER: True,
            }
        return None

    async def _republish(
        self, delivery: _Delivery, routing_key: str, headers: dict[str, Any]
    ) -> None:
        """A copy of the delivery through the default exchange (straight to one queue), in its
        trace, confirmed. Only our own headers travel: never the broker's ``x-death`` or
        ``x-delivery-count``."""
        with _scope(delivery):
            await publish_copy(
                self._broker,
                delivery.message,
                routing_key=routing_key,
                headers=headers,
                confirm_seconds=self._settings.worker_publish_timeout_seconds,
            )

    async def _give_back_all(
        self, batch: Iterable[_Delivery], reason: str, *, failed: bool = False
    ) -> None:
        for delivery in batch:
            if not delivery.settled:
                delivery.settled = True
                delivery.outcome = Outcome.REQUEUED
                delivery.lines.clear()  # nothing it would have logged happened
                await _give_back(delivery.message, reason, failed=failed)

    def _finish(self, delivery: _Delivery, elapsed: float) -> None:
        """Log what happened to the delivery, count it, and end its span."""
        if delivery.lines:
            # What _scope would add to each line, given once: entering it costs more than a line.
            about = trace_fields(delivery.span.get_span_context()) | delivery.about
            for level, message, extra in delivery.lines:
                logger.log(level, message, extra=about | extra)
        if delivery.outcome is not None:
            if delivery.round.replayed and delivery.outcome is not Outcome.REQUEUED:
                self._metrics.replays.inc()
            self._metrics.outcomes[delivery.outcome].inc()
            self._metrics.processing_duration.observe(elapsed)
            delivery.span.set_attribute("campaign.outcome", delivery.outcome.value)
        delivery.span.end()


def _unknown_campaign(delivery: _Delivery) -> None:
    delivery.outcome = Outcome.POISON
    delivery.error = describe(PoisonMessage("no such campaign in the event's tenant"))
    delivery.log(logging.ERROR, "event names no campaign of its tenant; dead-lettering")


def _refused(delivery: _Delivery) -> None:
    delivery.outcome = Outcome.POISON
    delivery.error = describe(PoisonMessage("the database refuses this event's values"))
    delivery.log(logging.ERROR, "the database refuses this event's values; dead-lettering")


class _scope:  # noqa: N801  (used as a function is: ``with _scope(delivery):``)
    """The delivery's span as the current one, and its ids on every line logged: what
    ``trace.use_span`` and ``log_context`` do, in one object instead of two generators (it is
    entered for every delivery). An exception leaving it is not recorded on the span: the
    callers catch what they expect and record it themselves."""

    __slots__ = ("_delivery", "_log_context", "_token")

    def __init__(self, delivery: _Delivery) -> None:
        self._delivery = delivery
        self._log_context = log_context(**delivery.about)

    def __enter__(self) -> None:
        self._token = context.attach(trace.set_span_in_context(self._delivery.span))
        self._log_context.__enter__()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._log_context.__exit__(*exc_info)
        finally:
            context.detach(self._token)


async def _reject(delivery: _Delivery) -> None:
    """Reject without requeue: to the queue's dead-letter exchange."""
    delivery.settled = True
    try:
        await delivery.message.reject(requeue=False)
    except Exception as exc:  # the channel is gone: the broker redelivers the message
        logger.warning("could not reject; the broker will redeliver", extra={"error": repr(exc)})


async def _ack_all(batch: list[_Delivery]) -> None:
    """Acknowledge the batch's remaining deliveries: one ``basic.ack(multiple=True)`` per
    channel (after a reconnect a batch can hold deliveries of the channel that closed, whose
    acks cannot be sent: the broker redelivers those)."""
    last: dict[int, Message] = {}
    for delivery in batch:
        delivery.settled = True
        message = delivery.message
        try:
            channel = id(message.channel)
        except ChannelInvalidStateError:  # closed: its deliveries come again
            continue
        if channel not in last or (message.delivery_tag or 0) > (last[channel].delivery_tag or 0):
            last[channel] = message
    for message in last.values():
        try:
            await message.ack(multiple=True)
        except Exception as exc:
            logger.warning(
                "could not acknowledge; the broker will redeliver", extra={"error": repr(exc)}
            )


async def _give_back(message: Message, reason: str, *, failed: bool) -> None:
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
