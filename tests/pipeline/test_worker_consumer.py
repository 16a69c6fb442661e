"""The worker's consumer (worker/consumer.py) and the messages it hands over (worker/delivery.py),
on a real broker: what a delivery carries, and how it is settled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue
from aio_pika.exceptions import MessageProcessError

from tests.support.polling import eventually
from tests.support.rabbit import consumer_count
from worker import consumer as consumer_module
from worker.consumer import BatchConsumer, Handler, Requeue
from worker.delivery import Message


class Received:
    """Batches handed to the consumer's handler, and what the handler did with them."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.second_ack_error: BaseException | None = None

    async def ack_twice(self, batch: list[Message]) -> None:
        for message in batch:
            self.messages.append(message)
            await message.ack()
            try:
                await message.ack()
            except MessageProcessError as exc:
                self.second_ack_error = exc

    async def requeue(self, batch: list[Message], failed: bool) -> None:
        raise AssertionError(f"nothing should be given back: {batch}")

    async def count(self) -> int:
        return len(self.messages)


@asynccontextmanager
async def on_queue(
    amqp_url: str, handle: Handler, requeue: Requeue
) -> AsyncIterator[tuple[AbstractQueue, BatchConsumer]]:
    """The test queue, on a robust channel, and a consumer for it, not started."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("consumer-test", durable=True)
        yield queue, BatchConsumer(handle, requeue=requeue, max_batch=10)


@asynccontextmanager
async def consuming(amqp_url: str, received: Received) -> AsyncIterator[AbstractQueue]:
    async with on_queue(amqp_url, received.ack_twice, received.requeue) as (queue, consumer):
        await consumer.start(queue)
        try:
            assert consumer.running
            yield queue
        finally:
            await consumer.stop(graceful_timeout=5)
            assert not consumer.running


async def publish(amqp_url: str, *messages: aio_pika.Message) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for message in messages:
            await channel.default_exchange.publish(message, routing_key="consumer-test")


class TestMessages:
    async def test_a_delivery_reads_as_it_was_published(self, amqp_url: str) -> None:
        sent_at = datetime(2026, 12, 3, 17, 0, 5, tzinfo=UTC)
        received = Received()
        async with consuming(amqp_url, received):
            await publish(
                amqp_url,
                aio_pika.Message(
                    b'{"campaign": 1}',
                    message_id="m-1",
                    correlation_id="c-1",
                    type="campaign.created",
                    content_type="application/json",
                    content_encoding="utf-8",
                    timestamp=sent_at,
                    headers={
                        "x-attempt": 2,
                        "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
                    },
                ),
            )
            await eventually(received.count, until=lambda n: n == 1, what="the delivery")

        message = received.messages[0]
        assert message.body == b'{"campaign": 1}'
        assert message.message_id == "m-1"
        assert message.correlation_id == "c-1"
        assert message.type == "campaign.created"
        assert message.content_type == "application/json"
        assert message.content_encoding == "utf-8"
        assert message.timestamp is not None
        assert message.timestamp.timestamp() == sent_at.timestamp()
        assert message.headers == {
            "x-attempt": 2,
            "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
        }
        assert (message.exchange, message.routing_key) == ("", "consumer-test")
        assert message.redelivered is False
        assert message.delivery_tag == 1

    async def test_a_second_settlement_is_refused_and_sends_nothing(self, amqp_url: str) -> None:
        # A second ack of one delivery tag would make the broker close the channel
        # (PRECONDITION_FAILED), and every unsettled delivery on it would come again.
        received = Received()
        async with consuming(amqp_url, received) as queue:
            await publish(amqp_url, aio_pika.Message(b"first"))
            await eventually(received.count, until=lambda n: n == 1, what="the first")
            await publish(amqp_url, aio_pika.Message(b"second"))
            await eventually(received.count, until=lambda n: n == 2, what="the second")
            assert not queue.channel.is_closed
            declared = await queue.channel.declare_queue("consumer-test", passive=True)

        assert isinstance(received.second_ack_error, MessageProcessError)
        assert [m.body for m in received.messages] == [b"first", b"second"]
        assert all(m.processed for m in received.messages)
        assert [m.redelivered for m in received.messages] == [False, False]
        assert declared.declaration_result.message_count == 0

    async def test_a_message_of_a_closed_channel_cannot_be_settled(self, amqp_url: str) -> None:
        held: list[Message] = []
        hold = asyncio.Event()

        async def keep(batch: list[Message]) -> None:
            held.extend(batch)
            hold.set()

        received = Received()
        async with on_queue(amqp_url, keep, received.requeue) as (queue, consumer):
            await consumer.start(queue)
            await publish(amqp_url, aio_pika.Message(b"held"))
            await asyncio.wait_for(hold.wait(), 10)
            await consumer.stop(graceful_timeout=1)
        # The connection is closed: the broker requeues what was not acknowledged.

        message = held[0]
        with pytest.raises(aio_pika.exceptions.ChannelInvalidStateError):
            await message.ack()
        assert not message.processed
        async with await aio_pika.connect(amqp_url) as check:
            again = await (await check.channel()).get_queue("consumer-test")
            redelivered = await again.get(no_ack=True, fail=False)
        assert redelivered is not None
        assert (redelivered.body, redelivered.redelivered) == (b"held", True)


class TestConsuming:
    async def test_starts_at_once_on_one_channel_make_one_consumer(self, amqp_url: str) -> None:
        # A reopened channel consumes again while start() may still be consuming on it; two
        # consumers on one channel would take twice the prefetch and settle out of order.
        received = Received()
        async with on_queue(amqp_url, received.ack_twice, received.requeue) as (queue, consumer):
            await asyncio.gather(consumer.start(queue), consumer.start(queue))
            try:
                consumers = await consumer_count(amqp_url, "consumer-test")
                await publish(amqp_url, aio_pika.Message(b"once"))
                await eventually(received.count, until=lambda n: n == 1, what="the delivery")
            finally:
                await consumer.stop(graceful_timeout=5)

        assert consumers == 1
        assert [m.body for m in received.messages] == [b"once"]

    @pytest.mark.parametrize(
        "cancel_seconds",
        [5.0, 0.0],
        ids=["the stop waits for the consume", "the stop gives up waiting and goes on"],
    )
    async def test_a_stop_during_a_reopen_leaves_no_consumer(
        self, amqp_url: str, monkeypatch: pytest.MonkeyPatch, cancel_seconds: float
    ) -> None:
        # The broker closes the channel (an ack of a tag it never sent); aio-pika reopens it and
        # the consumer consumes again, and the worker is told to stop while that consume is on
        # its way. A consumer left behind would take deliveries that nothing reads.
        monkeypatch.setattr(consumer_module, "_CANCEL_SECONDS", cancel_seconds)
        received = Received()
        async with on_queue(amqp_url, received.ack_twice, received.requeue) as (queue, consumer):
            await consumer.start(queue)
            stopping: list[asyncio.Task[None]] = []
            consume = consumer._consume

            async def consume_while_stopping() -> None:
                stopping.append(asyncio.create_task(consumer.stop(graceful_timeout=1)))
                await consume()

            monkeypatch.setattr(consumer, "_consume", consume_while_stopping)
            await (await queue.channel.get_underlay_channel()).basic_ack(99_999)

            async def stopped() -> bool:
                return bool(stopping) and stopping[0].done()

            await eventually(stopped, what="the stop")
            await stopping[0]
            # A stop that gave up leaves the consume to cancel itself when its consume-ok comes.
            consumers = await eventually(
                lambda: consumer_count(amqp_url, "consumer-test"),
                until=lambda n: n == 0,
                what="no consumer",
            )
            assert not consumer.running

        assert consumers == 0
