"""RabbitMQ: the topology, declared idempotently by every process that needs it, and the broker.

```
campaigns (topic) --campaign.created--> worker.campaign.created (quorum)
                                          | delivery limit
                                          v
        campaign.deadletter (fanout) --> campaign.deadletter (quorum)
                                          ^
                                          | expired at once (x-message-ttl 0)
worker.campaign.created.dead-letter (quorum) <-- the worker's dead letters, with their last error

worker.campaign.created.retry.<ms>ms (quorum, x-message-ttl) --expired--> "" (default exchange)
                                          routing key worker.campaign.created --> back to the queue
```

Queue arguments are constants: RabbitMQ refuses to redeclare a queue with other arguments, so
every process must declare exactly these (``rabbitmq/definitions.json`` mirrors them, and a test
holds the two equal). The retry ladder is the worker's setting; each delay queue's arguments
depend only on its own delay, so two ladders never conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from aio_pika.abc import AbstractIncomingMessage
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
)
from faststream.rabbit.schemas.queue import QuorumQueueArgs

from shared.events import CAMPAIGN_CREATED

logger = logging.getLogger(__name__)

CAMPAIGNS_EXCHANGE = RabbitExchange("campaigns", type=ExchangeType.TOPIC, durable=True)
DEAD_LETTER_EXCHANGE = RabbitExchange("campaign.deadletter", type=ExchangeType.FANOUT, durable=True)
WORKER_QUEUE_NAME = "worker.campaign.created"
# A message redelivered this many times (worker crashes, requeues) is dead-lettered by the broker
# instead of looping forever; the worker's own attempts are counted in a header (ATTEMPT_HEADER).
DELIVERY_LIMIT = 20


def _quorum_arguments(**arguments: Any) -> QuorumQueueArgs:
    """Quorum queue arguments with at-least-once dead-lettering: a dead-lettered message leaves
    its queue only once the target queue has confirmed it (this strategy requires the
    reject-publish overflow behaviour)."""
    return cast(
        QuorumQueueArgs,
        {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish", **arguments},
    )


WORKER_QUEUE = RabbitQueue(
    WORKER_QUEUE_NAME,
    queue_type=QueueType.QUORUM,
    durable=True,
    routing_key=CAMPAIGN_CREATED,
    arguments=_quorum_arguments(
        **{"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name, "x-delivery-limit": DELIVERY_LIMIT}
    ),
)
# The dead-letter queue has no DLX of its own: past its delivery limit a message would be dropped.
# RabbitMQ 4 gives every quorum queue a limit of 20 by default, so an operator who inspects
# messages in the UI ("Nack, requeue") or a replay consumer that requeues could lose them. An
# explicit, practically unreachable limit (RabbitMQ 3.x refuses -1, "no limit") keeps them.
DEAD_LETTER_DELIVERY_LIMIT = 1_000_000
DEAD_LETTER_QUEUE = RabbitQueue(
    "campaign.deadletter",
    queue_type=QueueType.QUORUM,
    durable=True,
    routing_key="",
    arguments=cast(QuorumQueueArgs, {"x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}),
)

# The worker's dead letters, each with its last error in its headers (a nack cannot add
# headers): every message expires here at once, and the broker moves it to the dead-letter
# exchange with its ``x-death`` record. The worker never consumes this queue, so a message marked
# as dead-lettered (DEAD_LETTER_MARK_HEADER) that reaches the worker's own queue was sent back by
# an operator: a replay (``deadletters replay``, or the RabbitMQ UI's "Move messages").
DEAD_LETTER_PARKING_QUEUE = RabbitQueue(
    f"{WORKER_QUEUE_NAME}.dead-letter",
    queue_type=QueueType.QUORUM,
    durable=True,
    arguments=_quorum_arguments(
        **{"x-message-ttl": 0, "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name}
    ),
)

# Headers the worker owns (never the broker's x-death: see retry_queue()).
# The attempt this delivery is (from 1), and the first attempt of its round: a replay starts a
# new round of WORKER_MAX_ATTEMPTS attempts, numbered on from where the last round ended.
ATTEMPT_HEADER = "x-attempt"
ROUND_HEADER = "x-round-first-attempt"
# An attempt number past this is no count of ours: the message is poison.
ATTEMPT_LIMIT = 1_000_000
ERROR_TYPE_HEADER = "x-last-error-type"
ERROR_MESSAGE_HEADER = "x-last-error-message"
# On every message the worker dead-letters. Back in the worker's queue: a replay.
DEAD_LETTER_MARK_HEADER = "x-dead-lettered"
# What earlier versions marked the copy with that they sent through the worker's own queue, to be
# rejected into the dead-letter exchange on arrival. Such a copy with no death record is still
# on its way (a deploy caught it in the queue) and is rejected as they did; one with a record of
# its death was moved back by an operator: a replay.
LEGACY_DEAD_LETTER_MARK_HEADER = "x-dead-letter-requested"
# What the broker adds to a dead-lettered message: its history there, never sent on by us.
BROKER_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


def died_into_dead_letters(headers: Mapping[str, Any]) -> bool:
    """Whether the broker's death record says the message has been in ``campaign.deadletter``
    (dead-lettered from the worker's queue, rejected or past the delivery limit, or from the
    parking queue), as opposed to a retry's pass through a delay queue."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return False
    return any(
        isinstance(death, Mapping)
        and (
            death.get("queue") == DEAD_LETTER_PARKING_QUEUE.name
            or (
                death.get("queue") == WORKER_QUEUE_NAME
                and death.get("reason") in ("rejected", "delivery_limit")
            )
        )
        for death in deaths
    )


def retry_queue(delay_seconds: float) -> RabbitQueue:
    """The delay queue for one rung of the retry ladder.

    Messages wait ``delay_seconds`` (a per-queue TTL, so each one expires at the head in order),
    then the broker dead-letters them through the default exchange straight back to
    ``worker.campaign.created``: no other subscriber of ``campaign.created`` sees a retry.
    """
    milliseconds = round(delay_seconds * 1000)
    return RabbitQueue(
        f"{WORKER_QUEUE_NAME}.retry.{milliseconds}ms",
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments=_quorum_arguments(
            **{
                "x-message-ttl": milliseconds,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": WORKER_QUEUE_NAME,
            }
        ),
    )


def connection_name(app_id: str) -> str:
    """The name this process gives its connections (the "client-provided name" in the RabbitMQ
    UI and ``rabbitmqctl list_connections``). Behind a load balancer every connection comes from
    the balancer's address: the name is what tells which process holds it."""
    return f"{app_id}@{socket.gethostname()} pid {os.getpid()}"


def named_url(url: str, name: str) -> str:
    """``url`` with the connection name ``name`` (aiormq's ``name`` query parameter), unless
    the URL names its connections already."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "name" for key, _ in query):
        return url
    return urlunsplit(parts._replace(query=urlencode([*query, ("name", name)], quote_via=quote)))


def create_broker(
    url: str,
    *,
    app_id: str,
    graceful_timeout: float | None = 15.0,
    reconnect_seconds: float = 5.0,
    middlewares: Sequence[Any] = (),
    apply_types: bool = True,
) -> RabbitBroker:
    """One broker per process: publisher confirms on, unroutable ``mandatory`` messages raise,
    connections named after the process (:func:`connection_name`).

    ``apply_types=False`` turns FastStream's dependency injection off (FastDepends resolves
    context parameters in a thread pool, several thread hops per message).
    """
    return RabbitBroker(
        named_url(url, connection_name(app_id)),
        default_channel=Channel(publisher_confirms=True, on_return_raises=True),
        graceful_timeout=graceful_timeout,
        middlewares=middlewares,
        app_id=app_id,
        reconnect_interval=reconnect_seconds,
        apply_types=apply_types,
        logger=logging.getLogger("faststream"),
        log_level=logging.DEBUG,
        # First connection attempts are ours to retry (BrokerStartup), not aio-pika's.
        fail_fast=True,
    )


async def publish_confirmed(
    broker: RabbitBroker,
    body: Any,
    *,
    exchange: str,
    routing_key: str,
    confirm_seconds: float,
    **properties: Any,
) -> None:
    """Publish persistent and ``mandatory``, and return once the broker has confirmed it: an
    unroutable message raises, and so does a confirm that takes longer than
    ``confirm_seconds``."""
    async with asyncio.timeout(confirm_seconds):
        await broker.publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            persist=True,
            mandatory=True,
            timeout=confirm_seconds,
            **properties,
        )


async def publish_copy(
    broker: RabbitBroker,
    message: AbstractIncomingMessage,
    *,
    routing_key: str,
    headers: dict[str, Any],
    confirm_seconds: float,
) -> None:
    """A copy of a received message (its body and properties, with ``headers`` only: never the
    broker's ``x-death`` or ``x-delivery-count``) straight to one queue through the default
    exchange, persistent and confirmed: a retry, a dead letter, a replay."""
    await publish_confirmed(
        broker,
        message.body,
        exchange="",
        routing_key=routing_key,
        confirm_seconds=confirm_seconds,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        message_type=message.type,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        timestamp=message.timestamp,
        headers=headers,
    )


async def declare_core(broker: RabbitBroker) -> None:
    """What a publisher of ``campaign.created`` relies on: the exchange, the worker's queue (so
    a confirmed ``mandatory`` publish has somewhere to land) and the dead-letter path."""
    dead_letters = await broker.declare_exchange(DEAD_LETTER_EXCHANGE)
    dead_letter_queue = await broker.declare_queue(DEAD_LETTER_QUEUE)
    await dead_letter_queue.bind(dead_letters, routing_key="")
    await broker.declare_queue(DEAD_LETTER_PARKING_QUEUE)
    exchange = await broker.declare_exchange(CAMPAIGNS_EXCHANGE)
    queue = await broker.declare_queue(WORKER_QUEUE)
    await queue.bind(exchange, routing_key=CAMPAIGN_CREATED)


async def declare_retry_ladder(broker: RabbitBroker, delays_seconds: Sequence[float]) -> None:
    for delay in delays_seconds:
        await broker.declare_queue(retry_queue(delay))


class BrokerStartup:
    """Connect and set up (declare the topology, start consuming or relaying) in the
    background, retrying the whole sequence until it succeeds, so a process starts without
    its broker and recovers by itself. After that, aio-pika's robust connection reconnects and
    restores consumers on its own.

    :meth:`ready` is the readiness check: the setup has completed and the connection is up.
    """

    def __init__(
        self,
        broker: RabbitBroker,
        setup: Callable[[], Awaitable[None]],
        *,
        what: str,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 15.0,
    ) -> None:
        self._broker = broker
        self._setup = setup
        self._what = what
        self._retry = retry_seconds
        self._max_retry = max_retry_seconds
        self._task: asyncio.Task[None] | None = None
        self.done = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self._what}-broker-startup")

    async def _run(self) -> None:
        delay = self._retry
        while True:
            try:
                await self._broker.connect()
                await self._setup()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable, refused login, a declaration refused …
                logger.warning(
                    "broker setup failed, retrying",
                    extra={"component": self._what, "error": repr(exc), "retry_in_seconds": delay},
                )
                # Start the next attempt from a clean state (no half-started consumers).
                with contextlib.suppress(Exception):
                    await self._broker.stop()
            else:
                self.done = True
                logger.info("broker connected and set up", extra={"component": self._what})
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def ready(self) -> None:
        if not self.done:
            raise ConnectionError("broker not connected and set up yet")
        await broker_ready(self._broker)


async def broker_ready(broker: RabbitBroker) -> None:
    """Raise unless the broker connection is up (for /ready)."""
    if not await broker.ping(timeout=0.5):
        raise ConnectionError("broker connection is down")
