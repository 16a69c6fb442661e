from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from campaign_service.outbox.repository import OutboxRepository


class CampaignMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.campaigns_created = Counter(
            "campaigns_created", "Campaigns created.", registry=registry
        )
        self.outbox_pending = Gauge(
            "outbox_pending_messages",
            "Outbox rows not yet published (read at scrape time).",
            registry=registry,
        )
        self.outbox_oldest_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished outbox row; 0 when none (read at scrape time).",
            registry=registry,
        )
        self.outbox_published = Counter(
            "outbox_published_messages",
            "Outbox rows published to RabbitMQ (confirmed) by this process.",
            registry=registry,
        )
        self.outbox_refused = Counter(
            "outbox_refused_messages",
            "Publishes the broker refused (returned or nacked); the row is retried later.",
            registry=registry,
        )

    async def refresh_outbox(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        async with sessionmaker() as session:
            count, oldest = await OutboxRepository(session).backlog()
        self.outbox_pending.set(count)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
        self.outbox_oldest_age.set(max(age, 0.0))


async def get_campaign_metrics(request: Request) -> CampaignMetrics:
    metrics: CampaignMetrics = request.app.state.metrics
    return metrics


CampaignMetricsDep = Annotated[CampaignMetrics, Depends(get_campaign_metrics)]
