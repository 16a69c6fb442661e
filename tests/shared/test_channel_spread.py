"""Publishes spread over several channels (the outbox relay's), on a real RabbitMQ: confirmed,
with the same properties and span as the broker's own publishes, refused when unroutable, and
side by side rather than one after the other."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aiormq.exceptions import ChannelNotFoundEntity, DeliveryError, PublishError
from faststream.rabbit import RabbitBroker
from opentelemetry import context, propagate
from opentelemetry.trace import StatusCode

from shared import spans as lean_spans
from shared.messaging import (
    CAMPAIGNS_EXCHANGE,
    WORKER_QUEUE_NAME,
    ChannelSpread,
)
from tests.support.rabbit import connected_broker, take_all
from tests.support.spans import STORED_TRACEPARENT, Spans, assert_publish_span_carried


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[RabbitBroker]:
    async with connected_broker(amqp_url) as broker:
        yield broker


def spread_of(broker: RabbitBroker, spans: Spans, channels: int = 4) -> ChannelSpread:
    tracer = lean_spans.tracer(__name__, spans.provider)
    return ChannelSpread(broker, channels=channels, tracer=tracer, app_id="test")


async def publish(
    spread: ChannelSpread,
    message_id: str,
    routing_key: str = "campaign.created",
    exchange: str = CAMPAIGNS_EXCHANGE.name,
) -> None:
    await spread.publish(
        b'{"hello": "world"}',
        exchange=exchange,
        routing_key=routing_key,
        message_id=message_id,
        message_type="campaign.created",
        headers={"traceparent": STORED_TRACEPARENT, "x-extra": "kept"},
        confirm_seconds=5,
    )


async def test_a_message_is_confirmed_with_its_properties_in_a_publish_span(
    broker: RabbitBroker, spans: Spans, amqp_url: str
) -> None:
    spread = spread_of(broker, spans)
    token = context.attach(propagate.extract({"traceparent": STORED_TRACEPARENT}))
    try:
        await publish(spread, "event-1")
    finally:
        context.detach(token)
        await spread.close()

    [message] = await take_all(amqp_url, WORKER_QUEUE_NAME)
    assert message.body == b'{"hello": "world"}'
    assert message.message_id == "event-1"
    assert message.type == "campaign.created"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.app_id == "test"
    assert message.headers["x-extra"] == "kept"

    [span] = spans.finished()
    assert_publish_span_carried(span, message.headers, message_id="event-1")


async def test_an_unroutable_message_is_refused(broker: RabbitBroker, spans: Spans) -> None:
    spread = spread_of(broker, spans)
    try:
        with pytest.raises((DeliveryError, PublishError)):
            await publish(spread, "lost", routing_key="nowhere")
    finally:
        await spread.close()

    [span] = spans.finished()
    assert span.status.status_code is StatusCode.ERROR


async def test_a_message_for_a_missing_exchange_is_refused_and_the_others_go(
    broker: RabbitBroker, spans: Spans, amqp_url: str
) -> None:
    """Published, a message for a missing exchange would close its channel under the other
    messages on it, and RabbitMQ would then close the connection."""
    spread = spread_of(broker, spans, channels=2)
    connection = await broker.connect()
    try:
        await publish(spread, "first")  # the channels are open, messages on their way on each
        results = await asyncio.gather(
            *(
                publish(spread, f"event-{n}", exchange="nowhere" if n % 10 == 0 else "campaigns")
                for n in range(60)
            ),
            return_exceptions=True,
        )
        await publish(spread, "after")
    finally:
        await spread.close()

    refused = [n for n, result in enumerate(results) if result is not None]
    assert refused == list(range(0, 60, 10)), results
    assert all(isinstance(results[n], ChannelNotFoundEntity) for n in refused)
    assert await broker.connect() is connection
    assert not connection.is_closed
    messages = await take_all(amqp_url, WORKER_QUEUE_NAME)
    assert len(messages) == 2 + 60 - len(refused)


async def test_publishes_go_side_by_side_while_the_event_loop_is_busy(
    broker: RabbitBroker, spans: Spans, amqp_url: str
) -> None:
    """Eight tasks keep the loop busy (a millisecond of CPU a step, like requests). Over one
    channel each publish waits for the one before it, a few turns of the loop each; over
    several they overlap."""
    turns = 0
    stop = asyncio.Event()

    async def busy() -> None:
        nonlocal turns
        while not stop.is_set():
            started = time.perf_counter()
            while time.perf_counter() - started < 0.001:
                pass
            turns += 1
            await asyncio.sleep(0)

    async def loop_turns(spread: ChannelSpread, prefix: str) -> int:
        nonlocal turns
        await publish(spread, f"{prefix}-open")  # opens the channels
        turns = 0
        await asyncio.gather(*(publish(spread, f"{prefix}-{n}") for n in range(48)))
        return turns // 8

    workers = [asyncio.create_task(busy()) for _ in range(8)]
    one, spread = spread_of(broker, spans, channels=1), spread_of(broker, spans, channels=12)
    try:
        over_one = await loop_turns(one, "one")
        over_several = await loop_turns(spread, "several")
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await one.close()
        await spread.close()

    assert len(await take_all(amqp_url, WORKER_QUEUE_NAME)) == 2 * 49
    assert over_several * 3 < over_one, (over_one, over_several)


async def test_it_opens_new_channels_when_the_broker_connects_again(
    broker: RabbitBroker, spans: Spans, amqp_url: str
) -> None:
    spread = spread_of(broker, spans)
    try:
        await publish(spread, "before")
        await broker.stop()
        await broker.connect()
        await publish(spread, "after")
    finally:
        await spread.close()

    messages = await take_all(amqp_url, WORKER_QUEUE_NAME)
    assert [m.message_id for m in messages] == ["before", "after"]
