"""The limit the worker is measured against: bare aio-pika consumers on the same broker, queue
and table, with no framework, no tracing, no metrics and no retries.

- ``batched``: buffers deliveries, writes each batch's rows with one multi-row INSERT, commits,
  then acks the batch with ``multiple=True``: the fastest safe loop (row before ack).
- ``naive``: one INSERT (autocommit) and one ack per message.

    python -m benchmarks.baseline_consumer --mode batched --count 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid

import aio_pika
import asyncpg

INSERT_MANY = """
INSERT INTO campaign_job_logs (campaign_id, tenant_id, event_id, status, payload, attempts)
SELECT campaign_id, tenant_id, event_id, 'success', payload, 1
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::jsonb[])
  AS batch(campaign_id, tenant_id, event_id, payload)
ON CONFLICT DO NOTHING
"""
INSERT_ONE = """
INSERT INTO campaign_job_logs (campaign_id, tenant_id, event_id, status, payload, attempts)
VALUES ($1, $2, $3, 'success', $4, 1)
ON CONFLICT DO NOTHING
"""


def row(message: aio_pika.abc.AbstractIncomingMessage) -> tuple[uuid.UUID, str, uuid.UUID, str]:
    event = json.loads(message.body)
    return (
        uuid.UUID(event["campaign_id"]),
        event["tenant_id"],
        uuid.UUID(event["event_id"]),
        message.body.decode(),
    )


async def batched(pool: asyncpg.Pool, queue: aio_pika.abc.AbstractQueue, count: int) -> None:
    batch_size, linger = 500, 0.005
    done = 0
    # Deliveries go to a queue of our own: a timed-out wait on aio-pika's queue iterator would
    # cancel it, and a cancelled iterator closes (its next call ends the loop).
    deliveries: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(deliveries.put)
    buffer: list[aio_pika.abc.AbstractIncomingMessage] = []
    while done < count:
        try:
            buffer.append(await asyncio.wait_for(deliveries.get(), timeout=linger))
            if len(buffer) < batch_size:
                continue
        except TimeoutError:
            if not buffer:
                continue
        rows = [row(message) for message in buffer]
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute(INSERT_MANY, *map(list, zip(*rows, strict=True)))
        await buffer[-1].ack(multiple=True)
        done += len(buffer)
        buffer = []


async def naive(pool: asyncpg.Pool, queue: aio_pika.abc.AbstractQueue, count: int) -> None:
    done = 0
    async with queue.iterator() as messages:
        async for message in messages:
            await pool.execute(INSERT_ONE, *row(message))
            await message.ack()
            done += 1
            if done >= count:
                return


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["batched", "naive"], required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"].replace("+asyncpg", ""), min_size=2, max_size=10
    )
    connection = await aio_pika.connect(os.environ["RABBITMQ_URL"])
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000 if args.mode == "batched" else 50)
        queue = await channel.declare_queue("worker.campaign.created", passive=True)
        await (batched if args.mode == "batched" else naive)(pool, queue, args.count)
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
