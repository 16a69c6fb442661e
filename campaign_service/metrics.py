from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from faststream.rabbit import RabbitBroker
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from campaign_service.outbox.repository import OutboxRepository
from shared.messaging import DEAD_LETTER_QUEUE, WORKER_QUEUE_NAME

# The queues whose depth and consumers the alerts watch (prometheus/alerts.yml).
WATCHED_QUEUES = (WORKER_QUEUE_NAME, DEAD_LETTER_QUEUE.name)


class CampaignMetrics:
    """Gauges read at scrape time are set by the process that answers the scrape, right before
    it does: with several processes the most recent value is the true one (a sum would count it
    once per process, a maximum would keep a stale one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.campaigns_created = Counter(
            "campaigns_created", "Campaigns created.", registry=registry
        )
        self.outbox_pending = Gauge(
            "outbox_pending_messages",
            "Outbox rows not yet published (read at scrape time).",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.outbox_oldest_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished outbox row; 0 when none (read at scrape time).",
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.outbox_published = Counter(
            "outbox_published_messages",
            "Outbox rows published to RabbitMQ (confirmed).",
            registry=registry,
        )
        self.outbox_refused = Counter(
            "outbox_refused_messages",
            "Publishes the broker refused (returned or nacked); the row is retried later.",
            registry=registry,
        )

        self.queue_messages = Gauge(
            "broker_queue_messages",
            "Messages ready in a queue of the platform, as RabbitMQ answers a passive declare "
            "(read at scrape time, once the broker is set up).",
            ["queue"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.queue_consumers = Gauge(
            "broker_queue_consumers",
            "Consumers attached to a queue of the platform, as RabbitMQ answers a passive "
            "declare (read at scrape time, once the broker is set up).",
            ["queue"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )

    async def refresh_outbox(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        async with sessionmaker() as session:
            count, oldest = await OutboxRepository(session).backlog()
        self.outbox_pending.set(count)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        self.outbox_oldest_age.set(max(age, 0.0))

    async def refresh_queues(self, broker: RabbitBroker) -> None:
        """Depth and consumers of :data:`WATCHED_QUEUES`, on a channel of the broker's own
        connection, opened for the scrape (a passive declare of a missing queue closes it)."""
        connection = await broker.connect()  # the connection the broker set up; no new one
        async with connection.channel() as channel:
            for name in WATCHED_QUEUES:
                queue = await channel.declare_queue(name, passive=True, robust=False)
                result = queue.declaration_result
                self.queue_messages.labels(name).set(result.message_count or 0)
                self.queue_consumers.labels(name).set(result.consumer_count or 0)


async def get_campaign_metrics(request: Request) -> CampaignMetrics:
    metrics: CampaignMetrics = request.app.state.metrics
    return metrics


CampaignMetricsDep = Annotated[CampaignMetrics, Depends(get_campaign_metrics)]
