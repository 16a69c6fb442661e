"""The worker's consumer: deliveries of ``worker.campaign.created`` in batches.

The broker pushes deliveries (at most the channel's prefetch unacknowledged at once) into a
buffer; one loop takes whatever has arrived, up to ``max_batch``, and hands it to the processor,
which settles every delivery of the batch before the loop takes the next one. Batches are
processed in delivery order, one at a time, so the processor may acknowledge a whole batch with
one ``basic.ack(multiple=True)``: every delivery before the batch's last has been settled.

Under load a batch is what arrived while the previous one was being written, so the database
does a fraction of the work per message and the broker gets one ack a batch; when idle a batch
is a single delivery, handled at once.

The queue object is aio-pika's, on a robust channel of the broker's connection that carries
this consumer and nothing else (:func:`worker.app.consumer_queue`). The consumer itself is
registered on the AMQP channel under it (aiormq's), whose deliveries become
:class:`~worker.delivery.Message` objects: aio-pika's own consumer builds a heavier message
object and a task per delivery (``worker/delivery.py`` says what that cost). So the consumer's
recovery is this module's: when aio-pika's robust channel reopens (a reconnect, or a channel
the broker closed) it has declared the queue again, and the consumer consumes again on the new
channel; when the broker cancels the consumer (its queue deleted), the consumer closes its
channel, so that aio-pika reopens it and declares the queue again. Closing it cuts off nothing
else: the worker publishes on the broker's default channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractQueue, AbstractRobustChannel
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp.commands import Basic

from worker.delivery import Message

logger = logging.getLogger(__name__)

Handler = Callable[[list[Message]], Awaitable[None]]
# Gives deliveries back to the queue; ``failed`` ones spend a delivery (basic.reject).
Requeue = Callable[[list[Message], bool], Awaitable[None]]


_CANCEL_SECONDS = 5.0


class BatchConsumer:
    def __init__(self, handle: Handler, *, requeue: Requeue, max_batch: int) -> None:
        self._handle = handle
        self._requeue = requeue
        self._max_batch = max_batch
        self._buffer: asyncio.Queue[Message] = asyncio.Queue()
        self._queue: AbstractQueue | None = None
        self._channel: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._consuming = asyncio.Lock()  # one basic.consume at a time: start() and a reopen
        self._closing = False
        self._busy = False
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def running(self) -> bool:
        """Attached to the queue, on an open channel."""
        return (
            self._consumer_tag is not None
            and self._channel is not None
            and not self._channel.is_closed
        )

    async def start(self, queue: AbstractQueue) -> None:
        """Consume ``queue``, a queue of a robust channel (FastStream's, and any of
        ``aio_pika.connect_robust``): the consumer comes back when the channel does."""
        if not isinstance(queue.channel, AbstractRobustChannel):
            raise TypeError("the consumer needs a queue on a robust channel, to consume again")
        self._queue = queue
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="worker-batches")
        queue.channel.reopen_callbacks.add(self._on_reopen)
        await self._consume()

    async def _consume(self) -> None:
        """Consume the queue on the AMQP channel under the queue's (aio-pika) channel."""
        assert self._queue is not None
        async with self._consuming:
            if self._closing:
                return  # stop() came first: it cancels no consumer this would add
            channel = await self._queue.channel.get_underlay_channel()
            if channel is self._channel and self.running:
                return  # reopened while start() was consuming: already on this channel
            channel.on_consumer_cancel_callbacks.add(self._on_cancel)
            # Not running until the broker confirms: no tag of the last channel on this one.
            self._channel, self._consumer_tag = channel, None
            consume_ok = await channel.basic_consume(self._queue.name, self._receive)
            self._consumer_tag = consume_ok.consumer_tag
            if self._closing:  # a stop that gave up waiting for this consume has gone on
                await self._cancel()

    async def _on_reopen(self, *_: Any) -> None:
        """aio-pika has reopened the channel (a reconnect; the queue is declared again)."""
        if self._closing:
            return
        try:
            await self._consume()
        except Exception:
            # The channel closed again meanwhile: its next reopening consumes.
            logger.exception("could not consume again after the channel reopened")

    async def _on_cancel(self, frame: Basic.Cancel) -> None:
        """The broker cancelled the consumer (its queue was deleted): close the channel, so
        that aio-pika's robust channel opens a new one, declares the queue again and the
        consumer consumes again (:meth:`_on_reopen`). Deliveries in hand cannot be settled on
        the new channel; the broker delivers them again."""
        channel = self._channel
        if self._closing or frame.consumer_tag != self._consumer_tag or channel is None:
            return
        logger.warning("the broker cancelled the consumer; consuming again on a new channel")
        self._consumer_tag = None
        # Not awaited here: this runs in the channel's frame reader, which the close waits on.
        closing = asyncio.create_task(channel.close(), name="worker-channel-close")
        self._background.add(closing)
        closing.add_done_callback(self._background.discard)

    async def _receive(self, message: DeliveredMessage) -> None:
        self._buffer.put_nowait(Message(message))

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

    async def _cancel(self) -> None:
        channel, tag, self._consumer_tag = self._channel, self._consumer_tag, None
        # A closed channel has no consumer to cancel: do not let the stop wait on the broker.
        if channel is not None and tag is not None and not channel.is_closed:
            channel.on_consumer_cancel_callbacks.discard(self._on_cancel)
            await channel.basic_cancel(tag)

    async def stop(self, *, graceful_timeout: float | None) -> None:
        """Take no new deliveries, let the batch in hand finish (up to ``graceful_timeout``
        seconds), then give back the deliveries still waiting. A batch still running after the
        grace period is cancelled: its unsettled deliveries return when the channel closes."""
        self._closing = True
        if self._queue is not None and isinstance(self._queue.channel, AbstractRobustChannel):
            self._queue.channel.reopen_callbacks.discard(self._on_reopen)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CANCEL_SECONDS):
                # After a consume in flight (a reopen's): the tag it sets is the one to cancel.
                async with self._consuming:
                    await self._cancel()
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
