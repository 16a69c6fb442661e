"""One delivery of ``worker.campaign.created``, as the worker reads and settles it.

The worker consumes on the AMQP channel itself (aiormq's, under FastStream's aio-pika channel)
rather than through aio-pika's ``Queue.consume``, which builds an ``IncomingMessage`` for every
delivery (some twenty attributes, each set through a checking ``__setattr__``) and runs the
callback in a task of its own, on top of the one aiormq already starts. Measured on a worker
draining 20,000 queued events, that was a sixth of its CPU per event. A :class:`Message` reads
the frame's values once, and acknowledges through the channel it came on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aio_pika.exceptions import MessageProcessError
from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError


class Message:
    """What the worker uses of a delivered message: its body, properties, routing and tag,
    and the three ways to settle it, once each (``processed`` once one was sent). The same
    contract as aio-pika's ``IncomingMessage``, whose place it takes."""

    __slots__ = (
        "_channel",
        "body",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_tag",
        "exchange",
        "headers",
        "message_id",
        "processed",
        "redelivered",
        "routing_key",
        "timestamp",
        "type",
    )

    def __init__(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        deliver = message.delivery
        self._channel: AbstractChannel = message.channel
        self.body: bytes = message.body
        self.headers: dict[str, Any] = properties.headers or {}
        self.message_id: str | None = properties.message_id
        self.correlation_id: str | None = properties.correlation_id
        self.type: str | None = properties.message_type
        self.content_type: str | None = properties.content_type
        self.content_encoding: str | None = properties.content_encoding
        self.timestamp: datetime | None = properties.timestamp
        self.exchange: str = getattr(deliver, "exchange", None) or ""
        self.routing_key: str = getattr(deliver, "routing_key", None) or ""
        self.delivery_tag: int = getattr(deliver, "delivery_tag", None) or 0
        self.redelivered: bool = bool(getattr(deliver, "redelivered", False))
        self.processed = False

    @property
    def channel(self) -> AbstractChannel:
        """The channel it came on; ChannelInvalidStateError once that has closed (its
        settlement can no longer be sent, and the broker delivers it again)."""
        if self._channel.is_closed:
            raise ChannelInvalidStateError(f"{self._channel!r} closed")
        return self._channel

    async def ack(self, multiple: bool = False) -> None:
        """Acknowledge it (with ``multiple``, every earlier delivery of its channel too)."""
        self._unsettled()
        await self.channel.basic_ack(self.delivery_tag, multiple=multiple)
        self.processed = True

    async def nack(self, requeue: bool = True) -> None:
        """Give it back (``requeue``) without counting a failed delivery."""
        self._unsettled()
        await self.channel.basic_nack(self.delivery_tag, requeue=requeue)
        self.processed = True

    async def reject(self, requeue: bool = False) -> None:
        """Reject it: requeued as a failed delivery, or to the queue's dead-letter exchange."""
        self._unsettled()
        await self.channel.basic_reject(self.delivery_tag, requeue=requeue)
        self.processed = True

    def _unsettled(self) -> None:
        # A second settlement of one delivery tag is a protocol error: the broker would close
        # the channel, and every unsettled delivery on it would come again.
        if self.processed:
            raise MessageProcessError("Message already processed", self)
