"""Publishing through the platform's broker (FastStream's telemetry middleware), on a real
RabbitMQ: a publish made in a stored request context is a span of that trace, and the message
carries the context its consumer continues."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from faststream.rabbit import RabbitBroker
from opentelemetry import context, propagate

from shared.messaging import CAMPAIGNS_EXCHANGE, WORKER_QUEUE_NAME, publish_confirmed
from shared.telemetry import broker_telemetry
from tests.support.rabbit import connected_broker
from tests.support.spans import STORED_TRACEPARENT, Spans, assert_publish_span_carried


@pytest.fixture
async def broker(amqp_url: str, spans: Spans) -> AsyncIterator[RabbitBroker]:
    """A broker whose publishes are traced into ``spans``."""
    async with connected_broker(amqp_url, middlewares=[broker_telemetry(spans.provider)]) as broker:
        yield broker


async def _received(amqp_url: str) -> aio_pika.abc.AbstractIncomingMessage:
    connection = await aio_pika.connect(amqp_url)
    try:
        queue = await (await connection.channel()).get_queue(WORKER_QUEUE_NAME)
        message = await queue.get(timeout=5)
        assert message is not None
        await message.ack()
        return message
    finally:
        await connection.close()


async def test_a_publish_is_in_the_stored_trace_whose_context_the_message_carries(
    broker: RabbitBroker, spans: Spans, amqp_url: str
) -> None:
    # As the outbox relay publishes: in the stored request context, with its traceparent.
    token = context.attach(propagate.extract({"traceparent": STORED_TRACEPARENT}))
    try:
        await publish_confirmed(
            broker,
            b"{}",
            exchange=CAMPAIGNS_EXCHANGE.name,
            routing_key="campaign.created",
            confirm_seconds=5,
            message_id="event-1",
            headers={"traceparent": STORED_TRACEPARENT},
        )
    finally:
        context.detach(token)
    message = await _received(amqp_url)

    assert_publish_span_carried(spans, message.headers)
