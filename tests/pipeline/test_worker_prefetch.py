"""The worker holds at most ``WORKER_PREFETCH`` deliveries unacknowledged; the rest wait in the
queue, for its next batch or for another worker sharing the queue."""

from __future__ import annotations

from typing import Any

import httpx

from tests.pipeline.conftest import make_worker_settings, wait_ready
from tests.support.campaigns import create_campaign
from tests.support.polling import eventually
from tests.support.rabbit import QueueCounts, RabbitAdmin, queue_counts
from worker.app import create_app as create_worker_app

QUEUE = "worker.campaign.created"
PREFETCH = 3
CAMPAIGNS = 10


def consumers_of(consumers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [consumer for consumer in consumers if consumer["queue"]["name"] == QUEUE]


class TestPrefetch:
    async def test_the_worker_takes_no_more_than_its_prefetch(
        self,
        database_url: str,
        amqp_url: str,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        # One campaign at a time, each taking a minute: the worker holds what it has taken.
        settings = make_worker_settings(
            database_url,
            amqp_url,
            worker_prefetch=PREFETCH,
            worker_concurrency=1,
            worker_simulated_work_seconds=60,
            worker_graceful_timeout_seconds=0.1,
        )
        app = create_worker_app(settings)
        async with app.router.lifespan_context(app):
            await wait_ready(app)
            for i in range(CAMPAIGNS):
                await create_campaign(campaign_client, headers, f"waiting {i}")

            counts = await eventually(
                lambda: queue_counts(amqp_url, QUEUE),
                until=lambda counts: counts is not None and counts.ready == CAMPAIGNS - PREFETCH,
                what="the campaigns the worker did not take, waiting in the queue",
            )
            consumers = await eventually(
                lambda: rabbit_admin.consumers(vhost),
                until=lambda consumers: len(consumers_of(consumers)) == 1,
                what="the worker's consumer in the management API",
            )

        assert counts == QueueCounts(ready=CAMPAIGNS - PREFETCH, consumers=1)
        # As the UI's queue page shows it: the prefetch, and explicit acknowledgements.
        [consumer] = consumers_of(consumers)
        assert consumer["prefetch_count"] == PREFETCH
        assert consumer["ack_required"] is True
