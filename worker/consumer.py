"""The worker's consumer: deliveries of ``worker.campaign.created`` in batches.

aio-pika's ``queue.consume`` puts every delivery (at most the channel's prefetch unacknowledged
at once) into a buffer; one loop takes whatever has arrived, up to ``max_batch``, and hands it to
the processor, which settles every delivery of the batch before the loop takes the next one.
Batches are processed in delivery order, one at a time, so the processor may acknowledge a whole
batch with one ``ack(multiple=True)``: every delivery before the batch's last has been settled.

Under load a batch is what arrived while the previous one was being written, so the database
does a fraction of the work per message and the broker gets one ack a batch; when idle a batch
is a single delivery, handled at once.

The queue is aio-pika's, on a robust channel that carries this consumer and nothing else
(:func:`worker.app.consumer_queue`). Recovery is aio-pika's: after a reconnect, or when the
broker cancels the consumer (its queue deleted), the robust connection opens the channel again,
declares and binds the queue again and consumes again with the same callback. Deliveries in hand
from before cannot be settled on the new channel; the broker delivers them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

logger = logging.getLogger(__name__)

Handler = Callable[[list[AbstractIncomingMessage]], Awaitable[None]]
# Gives deliveries back to the queue; ``failed`` ones spend a delivery (basic.reject).
Requeue = Callable[[list[AbstractIncomingMessage], bool], Awaitable[None]]

_CANCEL_SECONDS = 5.0


class BatchConsumer:
    def __init__(self, handle: Handler, *, requeue: Requeue, max_batch: int) -> None:
        self._handle = handle
        self._requeue = requeue
        self._max_batch = max_batch
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
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
        """Consume ``queue``, a queue of a robust channel: the consumer comes back when the
        channel does."""
        self._queue = queue
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="worker-batches")
        self._consumer_tag = await queue.consume(self._receive, no_ack=False)

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

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
                await self._requeue([m for m in batch if not m.processed], True)
            finally:
                self._busy = False

    async def stop(self, *, graceful_timeout: float | None) -> None:
        """Take no new deliveries, let the batch in hand finish (up to ``graceful_timeout``
        seconds), then give back the deliveries still waiting. A batch still running after the
        grace period is cancelled: its unsettled deliveries return when the channel closes."""
        self._closing = True
        queue, tag, self._consumer_tag = self._queue, self._consumer_tag, None
        # A closed channel has no consumer to cancel: do not let the stop wait on the broker.
        if queue is not None and tag is not None and not queue.channel.is_closed:
            with contextlib.suppress(Exception):
                await queue.cancel(tag, timeout=_CANCEL_SECONDS)
        task, self._loop_task = self._loop_task, None
        if task is None:
            return
        if self._busy:
            await asyncio.wait({task}, timeout=graceful_timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        waiting: list[AbstractIncomingMessage] = []
        while not self._buffer.empty():
            waiting.append(self._buffer.get_nowait())
        if waiting:
            await self._requeue(waiting, False)
