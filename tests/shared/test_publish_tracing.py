"""The broker middleware's publish span, on a real RabbitMQ: one span a publish, its context in
the message's headers, and a failed or unconfirmed publish marked as an error."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.exceptions import PublishError
from faststream.rabbit import RabbitBroker
from opentelemetry import context, propagate
from opentelemetry.trace import StatusCode

from shared.messaging import (
    CAMPAIGNS_EXCHANGE,
    WORKER_QUEUE_NAME,
    publish_confirmed,
)
from shared.telemetry import RabbitTracing
from tests.support.rabbit import connected_broker
from tests.support.spans import STORED_TRACEPARENT, Spans, assert_publish_span_carried


@pytest.fixture
async def broker(amqp_url: str, spans: Spans) -> AsyncIterator[RabbitBroker]:
    """A broker whose publishes are traced into ``spans``."""
    async with connected_broker(amqp_url, middlewares=[RabbitTracing(spans.provider)]) as broker:
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


async def test_a_publish_is_one_span_whose_context_the_message_carries(
    broker: RabbitBroker, spans: Spans, amqp_url: str
) -> None:
    # As the outbox relay publishes: in the stored request context, with its traceparent.
    token = context.attach(propagate.extract({"traceparent": STORED_TRACEPARENT}))
    try:
        await broker.publish(
            b"{}",
            exchange=CAMPAIGNS_EXCHANGE.name,
            routing_key="campaign.created",
            message_id="event-1",
            headers={"traceparent": STORED_TRACEPARENT},
        )
    finally:
        context.detach(token)
    message = await _received(amqp_url)

    [span] = spans.finished()
    assert_publish_span_carried(span, message.headers, message_id="event-1")


async def test_a_refused_publish_is_an_error(broker: RabbitBroker, spans: Spans) -> None:
    with pytest.raises(PublishError):  # unroutable, and published as mandatory
        await broker.publish(
            b"{}", exchange=CAMPAIGNS_EXCHANGE.name, routing_key="nowhere", mandatory=True
        )

    [span] = spans.finished()
    assert span.status.status_code is StatusCode.ERROR


async def test_a_publish_not_confirmed_in_time_is_an_error(
    broker: RabbitBroker, spans: Spans
) -> None:
    with pytest.raises(TimeoutError):
        await publish_confirmed(
            broker,
            b"{}",
            exchange=CAMPAIGNS_EXCHANGE.name,
            routing_key="campaign.created",
            confirm_seconds=1e-6,
        )

    [span] = spans.finished()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "cancelled: not confirmed in time"
