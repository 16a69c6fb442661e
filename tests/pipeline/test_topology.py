"""The broker topology the code declares, as the RabbitMQ UI shows it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from fastapi import FastAPI

from campaign_service.app import create_app as create_campaign_app
from shared.messaging import (
    DEAD_LETTER_DELIVERY_LIMIT,
    DELIVERY_LIMIT,
    create_broker,
    declare_core,
    declare_retry_ladder,
)
from tests.pipeline.conftest import make_campaign_settings, make_worker_settings, wait_ready
from tests.support.polling import eventually
from tests.support.rabbit import RabbitAdmin
from tests.support.topology import declared_topology
from worker.app import create_app as create_worker_app
from worker.settings import WorkerSettings

DEFINITIONS = Path(__file__).resolve().parents[2] / "rabbitmq" / "definitions.json"


def definitions() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return {key: document[key] for key in ("exchanges", "queues", "bindings")}


class TestTopology:
    async def test_services_declare_what_definitions_json_holds(
        self,
        database_url: str,
        amqp_url: str,
        vhost: str,
        rabbit_admin: RabbitAdmin,
        user_client: httpx.AsyncClient,
    ) -> None:
        # The default retry ladder, as definitions.json describes it.
        worker_settings = make_worker_settings(
            database_url,
            amqp_url,
            worker_retry_delays_seconds=WorkerSettings.model_fields[
                "worker_retry_delays_seconds"
            ].default,
            worker_max_attempts=WorkerSettings.model_fields["worker_max_attempts"].default,
        )
        worker = create_worker_app(worker_settings)
        campaigns = create_campaign_app(
            make_campaign_settings(database_url, amqp_url), jwks_client=user_client
        )
        async with (
            worker.router.lifespan_context(worker),
            campaigns.router.lifespan_context(campaigns),
        ):
            await wait_ready(worker)
            await wait_ready(campaigns)
            topology = await declared_topology(rabbit_admin, vhost)

        assert topology == definitions()
        queue = next(q for q in topology["queues"] if q["name"] == "worker.campaign.created")
        assert queue["arguments"]["x-queue-type"] == "quorum"
        assert queue["arguments"]["x-dead-letter-exchange"] == "campaign.deadletter"
        assert queue["arguments"]["x-dead-letter-strategy"] == "at-least-once"
        assert queue["arguments"]["x-delivery-limit"] == DELIVERY_LIMIT
        # Dead letters survive being requeued (inspected in the UI, replayed) far past the
        # default limit that RabbitMQ 4 would otherwise apply before dropping them.
        dead_letters = next(q for q in topology["queues"] if q["name"] == "campaign.deadletter")
        assert dead_letters["arguments"]["x-delivery-limit"] == DEAD_LETTER_DELIVERY_LIMIT
        # The worker's dead letters pass through a queue that no one consumes, on their way.
        parking = next(
            q for q in topology["queues"] if q["name"] == "worker.campaign.created.dead-letter"
        )
        assert parking["arguments"]["x-message-ttl"] == 0
        assert parking["arguments"]["x-dead-letter-exchange"] == "campaign.deadletter"

    async def test_declaring_again_is_idempotent(
        self, amqp_url: str, vhost: str, rabbit_admin: RabbitAdmin
    ) -> None:
        for _ in range(2):
            broker = create_broker(amqp_url, app_id="test")
            await broker.connect()
            await declare_core(broker)
            await declare_retry_ladder(broker, (1.0, 5.0))
            await broker.stop()

        names = {queue["name"] for queue in await rabbit_admin.queues(vhost)}
        assert names == {
            "campaign.deadletter",
            "worker.campaign.created",
            "worker.campaign.created.dead-letter",
            "worker.campaign.created.retry.1000ms",
            "worker.campaign.created.retry.5000ms",
        }

    async def test_a_retry_returns_to_the_worker_queue_only(
        self, amqp_url: str, vhost: str, rabbit_admin: RabbitAdmin
    ) -> None:
        broker = create_broker(amqp_url, app_id="test")
        await broker.connect()
        await declare_core(broker)
        await declare_retry_ladder(broker, (0.2,))
        await broker.stop()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            # Another subscriber of campaign.created, besides the worker.
            bystander = await channel.declare_queue("bystander", exclusive=True)
            await bystander.bind("campaigns", routing_key="campaign.created")

            await channel.default_exchange.publish(
                aio_pika.Message(b"{}", message_id="retry-1"),
                routing_key="worker.campaign.created.retry.200ms",
            )
            queue = await channel.declare_queue("worker.campaign.created", passive=True)
            returned = await eventually(
                lambda: queue.get(fail=False, no_ack=True),
                until=lambda message: message is not None,
                timeout=5,
                what="the retried message back in the worker queue",
            )

            assert returned is not None
            assert returned.message_id == "retry-1"
            deaths: Any = returned.headers["x-death"]
            assert deaths[0]["reason"] == "expired"
            assert await bystander.get(fail=False) is None

    async def test_worker_reports_consuming_when_ready(self, worker: FastAPI) -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=worker), base_url="http://worker"
        ) as client:
            ready = await client.get("/ready")

        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "consumer": "ok"}


class TestConflictingQueue:
    async def test_a_queue_with_other_arguments_keeps_a_service_unready_until_replaced(
        self,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        async def refusals() -> list[str]:
            return [
                str(getattr(record, "error", ""))
                for record in caplog.records
                if record.getMessage() == "broker setup failed, retrying"
            ]

        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            # As an older version left it: the same name, other arguments.
            await channel.declare_queue(
                "campaign.deadletter", durable=True, arguments={"x-queue-type": "quorum"}
            )
            campaigns = create_campaign_app(
                make_campaign_settings(database_url, amqp_url), jwks_client=user_client
            )
            async with (
                campaigns.router.lifespan_context(campaigns),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=campaigns), base_url="http://c"
                ) as client,
            ):
                [reason, *_] = await eventually(refusals, what="the broker's refusal logged")
                refused = await client.get("/ready")
                await channel.queue_delete("campaign.deadletter")  # the documented way out

                await wait_ready(campaigns, timeout=30)

        assert "PRECONDITION_FAILED" in reason
        assert refused.status_code == 503
        assert refused.json()["checks"]["broker"] == "unreachable"
