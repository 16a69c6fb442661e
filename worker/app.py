"""The worker process: consumes ``worker.campaign.created`` in batches and serves /health,
/ready and /metrics on the metrics port. Its lifespan owns the broker: connect (retrying until
RabbitMQ answers), declare the topology, consume; on shutdown stop consuming, let the batch in
hand finish, give back what was prefetched, then close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from aio_pika.abc import AbstractRobustQueue
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from prometheus_client import CollectorRegistry

from shared.db import create_engine, ping
from shared.events import CAMPAIGN_CREATED
from shared.logs import configure_logging
from shared.messaging import (
    CAMPAIGNS_EXCHANGE,
    WORKER_QUEUE,
    BrokerStartup,
    create_broker,
    declare_core,
    declare_retry_ladder,
)
from shared.metrics import metrics_router
from shared.telemetry import NO_NATIVE_TELEMETRY, broker_telemetry, configure_tracing
from shared.web import ReadinessCheck, health_router
from worker.consumer import BatchConsumer
from worker.metrics import WorkerMetrics
from worker.processing import CampaignProcessor
from worker.settings import WorkerSettings
from worker.store import JobLogStore

logger = logging.getLogger(__name__)


def create_worker_broker(
    settings: WorkerSettings, *, app_id: str, middlewares: Sequence[Any]
) -> RabbitBroker:
    """The worker's broker: confirms, no dependency injection (it has no FastStream
    subscriber: :class:`BatchConsumer` consumes, on a channel of its own)."""
    return create_broker(
        settings.rabbitmq_url,
        app_id=app_id,
        graceful_timeout=settings.worker_graceful_timeout_seconds,
        reconnect_seconds=settings.rabbitmq_reconnect_seconds,
        middlewares=middlewares,
        apply_types=False,
    )


async def consumer_queue(broker: RabbitBroker, *, prefetch: int) -> AbstractRobustQueue:
    """The worker's queue on a channel of its own, of the broker's connection, with a bounded
    prefetch: the consumer's channel carries nothing else, so the batches'
    ``ack(multiple=True)`` covers only the worker's own deliveries, and the confirmed retry and
    dead-letter publishes go on the broker's default channel. The channel is aio-pika's robust
    one: it comes back with the connection, with its prefetch, declares the queue and its
    binding again and consumes again."""
    connection = await broker.connect()
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(
            WORKER_QUEUE.name,
            durable=WORKER_QUEUE.durable,
            exclusive=WORKER_QUEUE.exclusive,
            auto_delete=WORKER_QUEUE.auto_delete,
            arguments=WORKER_QUEUE.arguments,
        )
        await queue.bind(CAMPAIGNS_EXCHANGE.name, routing_key=CAMPAIGN_CREATED)
    except BaseException:
        await channel.close()
        raise
    return queue


def create_app(settings: WorkerSettings | None = None) -> FastAPI:
    settings = settings or WorkerSettings()
    configure_logging(settings)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    tracing = configure_tracing(settings.service_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as cleanup:
            # Callbacks run in reverse order, each even when an earlier one failed.
            engine = create_engine(settings, application_name=settings.service_name)
            cleanup.push_async_callback(engine.dispose)
            stopping = asyncio.Event()
            broker = create_worker_broker(
                settings, app_id=settings.service_name, middlewares=[broker_telemetry(tracing)]
            )
            store = JobLogStore(
                engine,
                retry_max_seconds=settings.worker_db_retry_max_seconds,
                stopping=stopping,
            )
            cleanup.push_async_callback(store.stop)  # after the broker: batches need it
            processor = CampaignProcessor(
                broker=broker, store=store, settings=settings, metrics=metrics, stopping=stopping
            )
            consumer = BatchConsumer(
                processor.handle_batch,
                requeue=processor.requeue,
                max_batch=settings.worker_batch_max,
            )

            async def set_up_broker() -> None:
                await declare_core(broker)
                await declare_retry_ladder(broker, settings.retry_delays_in_use)
                await broker.start()
                # Its channel closes with the broker's connection, at the end of the stop.
                queue = await consumer_queue(broker, prefetch=settings.worker_prefetch)
                try:
                    await consumer.start(queue)
                except BaseException:  # the next attempt opens a channel of its own
                    await queue.channel.close()
                    raise
                logger.info(
                    "consuming",
                    extra={
                        "queue": WORKER_QUEUE.name,
                        "prefetch": settings.worker_prefetch,
                        "batch_max": settings.worker_batch_max,
                        "concurrency": settings.concurrency,
                    },
                )

            async def stop_consuming() -> None:
                logger.info("stopping: no new deliveries; finishing the ones in hand")
                stopping.set()  # messages waiting for the database are requeued, not held
                await consumer.stop(graceful_timeout=settings.worker_graceful_timeout_seconds)
                await broker.stop()
                logger.info("stopped")

            cleanup.push_async_callback(stop_consuming)
            startup = BrokerStartup(broker, set_up_broker, what=settings.service_name)
            startup.start()
            cleanup.push_async_callback(startup.stop)

            app.state.settings = settings
            app.state.engine = engine
            app.state.broker = broker
            app.state.broker_startup = startup
            app.state.consumer = consumer
            yield

    app = FastAPI(
        title="worker",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        telemetry=NO_NATIVE_TELEMETRY,
    )

    async def consuming() -> None:
        if not app.state.consumer.running:
            raise ConnectionError("not consuming")

    def readiness() -> dict[str, ReadinessCheck]:
        return {
            "database": partial(ping, app.state.engine),
            "broker": app.state.broker_startup.ready,
            "consumer": consuming,
        }

    app.include_router(health_router(readiness, timeout=settings.readiness_timeout_seconds))
    app.include_router(metrics_router(registry))
    return app
