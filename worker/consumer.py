"""The worker's consumer: deliveries of ``worker.campaign.created`` in batches.

The broker pushes deliveries (at most the channel's prefetch unacknowledged at once) into a
buffer; one loop takes whatever has arrived, up to ``max_batch``, and hands it to the processor,
which settles every delivery of the batch before the loop takes the next one. Batches are
processed in delivery order, one at a time, so the processor may acknowledge a whole batch with
one ``basic.ack(multiple=True)``: every delivery before the batch's last has been settled.

Under load a batch is what arrived while the previous one was being written, so the database
does a fraction of the work per message and the broker gets one ack a batch; when idle a batch
is a single delivery, handled at once.

The queue object comes from the broker (FastStream's connection and channel, aio-pika
underneath); aio-pika's robust channel restores the consumer after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

logger = logging.getLogger(__name__)

Delivery = AbstractIncomingMessage
Handler = Callable[[list[Delivery]], Awaitable[None]]
# Gives deliveries back to the queue; ``failed`` ones spend a delivery (basic.reject).
Requeue = Callable[[list[Delivery], bool], Awaitable[None]]


_CANCEL_SECONDS = 5.0


class BatchConsumer:
    def __init__(self, handle: Handler, *, requeue: Requeue, max_batch: int) -> None:
        self._handle = handle
        self._requeue = requeue
        self._max_batch = max_batch
        self._buffer: asyncio.Queue[Delivery] = asyncio.Queue()
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False

    @property
    def running(self) -> bool:
        """Attached to the queue, on an open channel."""
        return (
            self._consumer_tag is not None
            and self._queue is not None
            and not self._queue.channel.is_closed
        )

    async def start(self, queue: AbstractQueue) -> None:
        self._queue = queue
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="worker-batches")
        self._consumer_tag = await queue.consume(self._receive)

    async def _receive(self, delivery: Delivery) -> None:
        self._buffer.put_nowait(delivery)

    async def _loop(self) -> None:
        while not self._closing:
            batch = [await self._buffer.get()]
            while len(batch) < self._max_batch and not self._buffer.empty():
                batch.append(self._buffer.get_nowait())
            self._busy = True
            try:
                await self._handle(batch)
            except Exception:  # the handler settles its own failures; this is a last resort
                logger.exception("batch handler failed; giving its deliveries back")
                # The next batch's ack(multiple=True) would otherwise acknowledge them
                # unprocessed; as failed deliveries, so the delivery limit ends a loop.
                await self._requeue([d for d in batch if not d.processed], True)
            finally:
                self._busy = False

    async def stop(self, *, graceful_timeout: float | None) -> None:
        """Take no new deliveries, let the batch in hand finish (up to ``graceful_timeout``
        seconds), then give back the deliveries still waiting. A batch still running after the
        grace period is cancelled: its unsettled deliveries return when the channel closes."""
        self._closing = True
        if self._queue is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            # A closed channel has no consumer to cancel, and during an outage aio-pika would
            # wait for the reconnection: do not let the stop wait on the broker.
            if not self._queue.channel.is_closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_CANCEL_SECONDS):
                        await self._queue.cancel(tag)
        task, self._loop_task = self._loop_task, None
        if task is None:
            return
        if self._busy:
            await asyncio.wait({task}, timeout=graceful_timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        waiting = []
        while not self._buffer.empty():
            waiting.append(self._buffer.get_nowait())
        if waiting:
            await self._requeue(waiting, False)
