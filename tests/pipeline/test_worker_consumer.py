"""The worker's consumer (worker/consumer.py) on a real broker: deliveries come in batches, and a
stop gives back what no batch has taken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from tests.support.polling import eventually
from tests.support.rabbit import consumer_count, queue_counts
from worker.consumer import BatchConsumer, Handler, Requeue

QUEUE = "consumer-test"


@asynccontextmanager
async def on_queue(
    amqp_url: str, handle: Handler, requeue: Requeue, *, prefetch: int = 100
) -> AsyncIterator[tuple[AbstractQueue, BatchConsumer]]:
    """The test queue, on a robust channel, and a consumer for it, not started."""
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(QUEUE, durable=True)
        yield queue, BatchConsumer(handle, requeue=requeue, max_batch=10)


async def publish(amqp_url: str, *bodies: bytes) -> None:
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=QUEUE)


async def never_requeue(batch: list[AbstractIncomingMessage], failed: bool) -> None:
    raise AssertionError(f"nothing should be given back: {batch}")


class TestBatches:
    async def test_queued_deliveries_come_in_batches_of_at_most_max_batch(
        self, amqp_url: str
    ) -> None:
        sizes: list[int] = []
        bodies: list[bytes] = []

        async def ack_batch(batch: list[AbstractIncomingMessage]) -> None:
            sizes.append(len(batch))
            bodies.extend(message.body for message in batch)
            await batch[-1].ack(multiple=True)

        async def received() -> int:
            return len(bodies)

        sent = [f"m-{n}".encode() for n in range(35)]
        async with on_queue(amqp_url, ack_batch, never_requeue) as (queue, consumer):
            await publish(amqp_url, *sent)
            await consumer.start(queue)
            assert consumer.running
            await eventually(received, until=lambda n: n == len(sent), what="every delivery")
            await consumer.stop(graceful_timeout=5)
            assert not consumer.running

        assert bodies == sent  # in delivery order
        assert max(sizes) <= 10
        assert max(sizes) > 1  # queued deliveries share batches
        counts = await queue_counts(amqp_url, QUEUE)
        assert counts is not None
        assert counts.ready == 0  # one ack a batch covered every delivery


class TestStop:
    async def test_a_stop_gives_back_what_no_batch_took(self, amqp_url: str) -> None:
        release = asyncio.Event()
        handed: list[bytes] = []
        given_back: list[tuple[bytes, bool]] = []

        async def hold_first(batch: list[AbstractIncomingMessage]) -> None:
            handed.extend(message.body for message in batch)
            await release.wait()
            await batch[-1].ack(multiple=True)

        async def requeue(batch: list[AbstractIncomingMessage], failed: bool) -> None:
            for message in batch:
                given_back.append((message.body, failed))
                await message.nack(requeue=True)

        async def buffered() -> int | None:
            return await consumer_count(amqp_url, QUEUE)

        async with on_queue(amqp_url, hold_first, requeue, prefetch=5) as (queue, consumer):
            await consumer.start(queue)
            await publish(amqp_url, b"first")
            await eventually(lambda: _count(handed), until=lambda n: n == 1, what="a batch")
            await publish(amqp_url, b"second", b"third")
            # Both prefetched while the first batch is held.
            await eventually(
                lambda: queue_counts(amqp_url, QUEUE),
                until=lambda c: c is not None and c.ready == 0,
                what="the others prefetched",
            )
            stopping = asyncio.create_task(consumer.stop(graceful_timeout=5))
            await eventually(buffered, until=lambda n: n == 0, what="the consumer cancelled")
            release.set()
            await stopping

        assert handed == [b"first"]
        assert given_back == [(b"second", False), (b"third", False)]
        counts = await queue_counts(amqp_url, QUEUE)
        assert counts is not None
        assert counts.ready == 2


async def _count(items: list[bytes]) -> int:
    return len(items)
