"""The broker cancels the worker's consumer (its queue deleted from the management UI or API):
the worker declares the queue again, binds it as before and consumes again, by itself (aio-pika's
robust connection recovers), and goes on processing campaigns."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI

from tests.support.campaigns import create_campaign, steps, wait_for_jobs
from tests.support.polling import eventually
from tests.support.rabbit import RabbitAdmin, consumer_count

QUEUE = "worker.campaign.created"
RECOVERY_SECONDS = 30.0


def bindings_of(bindings: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The queue's bindings from named exchanges (the default exchange's implicit one aside)."""
    return sorted(
        (binding["source"], binding["routing_key"], repr(binding["arguments"]))
        for binding in bindings
        if binding["destination"] == QUEUE
        and binding["destination_type"] == "queue"
        and binding["source"]
    )


async def ready_status(app: FastAPI) -> int:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://probe"
    ) as client:
        return (await client.get("/ready")).status_code


class TestConsumerCancelledByTheBroker:
    async def test_a_deleted_queue_is_declared_bound_and_consumed_again(
        self,
        worker: FastAPI,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        amqp_url: str,
    ) -> None:
        before = await rabbit_admin.queue(vhost, QUEUE)
        bound_before = bindings_of(await rabbit_admin.bindings(vhost))
        assert await consumer_count(amqp_url, QUEUE) == 1
        assert bound_before == [("campaigns", "campaign.created", "{}")]

        # As from the UI's "Delete queue": RabbitMQ sends basic.cancel to the worker's consumer.
        response = await rabbit_admin.http.delete(
            f"/queues/{quote(vhost, safe='')}/{quote(QUEUE, safe='')}"
        )
        assert response.status_code == 204, response.text

        await eventually(
            lambda: consumer_count(amqp_url, QUEUE),
            until=lambda count: count == 1,
            timeout=RECOVERY_SECONDS,
            interval=0.1,
            what="the queue declared again with the worker consuming it",
        )
        after = await rabbit_admin.queue(vhost, QUEUE)
        bound_after = await eventually(
            lambda: rabbit_admin.bindings(vhost),
            until=lambda bindings: bindings_of(bindings) == bound_before,
            timeout=RECOVERY_SECONDS,
            interval=0.1,
            what="the queue bound as before",
        )
        ready = await eventually(
            lambda: ready_status(worker),
            until=lambda code: code == 200,
            timeout=RECOVERY_SECONDS,
            interval=0.1,
            what="the worker ready",
        )

        # The same queue as before (a quorum queue with the platform's arguments), in use.
        assert after["arguments"] == before["arguments"]
        assert after["durable"] is True
        assert bindings_of(bound_after) == bound_before
        assert ready == 200
        campaign = await create_campaign(campaign_client, headers, "after the queue came back")
        jobs = await wait_for_jobs(
            campaign_client, headers, campaign["id"], timeout=RECOVERY_SECONDS
        )
        assert steps(jobs) == [("success", 1)]
