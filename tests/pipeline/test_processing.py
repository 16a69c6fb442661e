"""The worker on the real broker and database: success, retries through the TTL ladder,
dead-lettering, poison messages and duplicate deliveries."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitQueue
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from shared.events import CampaignCreated
from shared.messaging import ATTEMPT_HEADER, ERROR_MESSAGE_HEADER, ERROR_TYPE_HEADER
from tests.pipeline.conftest import TEST_MAX_ATTEMPTS, TEST_RETRY_DELAYS
from tests.support.campaigns import create_campaign, jobs_of, steps, wait_for_jobs
from tests.support.metrics import outcomes, value
from tests.support.polling import eventually
from tests.support.rabbit import RabbitAdmin, publish_raw
from tests.support.spans import Spans
from worker import processing as worker_processing

pytestmark = pytest.mark.usefixtures("worker")


async def dead_letters(rabbit_admin: RabbitAdmin, vhost: str, count: int = 1) -> list[Any]:
    return await eventually(
        lambda: rabbit_admin.peek(vhost, "campaign.deadletter"),
        until=lambda messages: len(messages) >= count,
        timeout=10,
        what="dead-lettered message",
    )


async def unprocessed(
    client: httpx.AsyncClient, headers: dict[str, str], db: asyncpg.Connection, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A campaign and its event as if the event had never been processed: created through the
    API, processed, then its rows deleted. Returns the campaign and its job (the event is the
    job's payload)."""
    campaign = await create_campaign(client, headers, name)
    [job] = await wait_for_jobs(client, headers, campaign["id"])
    await db.execute(
        "DELETE FROM campaign_job_logs WHERE event_id = $1", uuid.UUID(job["event_id"])
    )
    return campaign, job


async def handled(worker: FastAPI, **expected: int) -> dict[str, float]:
    """The worker's outcome counts once they reach ``expected`` (read from its /metrics)."""
    return await eventually(
        lambda: outcomes(worker),
        until=lambda seen: all(seen.get(name, 0) >= count for name, count in expected.items()),
        timeout=10,
        what=f"worker outcomes {expected}",
    )


class TestSuccess:
    async def test_one_success_row_within_a_second(
        self, campaign_client: httpx.AsyncClient, headers: dict[str, str], tenant: str
    ) -> None:
        campaign = await create_campaign(
            campaign_client, headers, "Spring sale", description="10% off"
        )
        created = time.monotonic()

        jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=1.0)

        assert time.monotonic() - created < 1.0
        assert steps(jobs) == [("success", 1)]
        payload = jobs[0]["payload"]
        event = CampaignCreated.model_validate(payload)
        assert event.campaign_id == uuid.UUID(campaign["id"])
        assert event.tenant_id == tenant
        assert (event.name, event.description) == ("Spring sale", "10% off")
        assert payload["event_type"] == "campaign.created"
        # Named by a random id, not the table's sequence: it says nothing of other tenants.
        assert uuid.UUID(jobs[0]["id"]).version == 4
        assert payload["schema_version"] == 1
        assert jobs[0]["event_id"] == payload["event_id"]
        assert jobs[0]["last_error"] is None


class TestRetries:
    async def test_failing_twice_retries_after_each_ladder_delay(
        self, campaign_client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        campaign = await create_campaign(campaign_client, headers, "Flaky [fail:2]")

        jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=10)

        assert steps(jobs) == [("retry", 1), ("retry", 2), ("success", 3)]
        assert "SimulatedFailure" in jobs[0]["last_error"]
        processed = [datetime.fromisoformat(job["processed_at"]) for job in jobs]
        first_wait = (processed[1] - processed[0]).total_seconds()
        second_wait = (processed[2] - processed[1]).total_seconds()
        assert first_wait >= TEST_RETRY_DELAYS[0]
        assert second_wait >= TEST_RETRY_DELAYS[1]
        assert len({job["event_id"] for job in jobs}) == 1

    async def test_failing_always_ends_in_the_dead_letter_queue(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        campaign = await create_campaign(campaign_client, headers, "Doomed [fail:always]")

        jobs = await wait_for_jobs(
            campaign_client, headers, campaign["id"], final="failed", timeout=10
        )
        [message] = await dead_letters(rabbit_admin, vhost)

        assert steps(jobs) == [("retry", 1), ("retry", 2), ("failed", TEST_MAX_ATTEMPTS)]
        event_id = jobs[0]["event_id"]
        properties = message["properties"]
        assert json.loads(message["payload"]) == jobs[0]["payload"]  # the original body
        assert properties["message_id"] == event_id
        assert properties["delivery_mode"] == 2
        message_headers = properties["headers"]
        assert message_headers[ATTEMPT_HEADER] == TEST_MAX_ATTEMPTS
        assert message_headers[ERROR_TYPE_HEADER] == "SimulatedFailure"
        assert f"attempt {TEST_MAX_ATTEMPTS}" in message_headers[ERROR_MESSAGE_HEADER]
        [death] = message_headers["x-death"]
        assert (death["queue"], death["reason"]) == (
            "worker.campaign.created.dead-letter",
            "expired",
        )


class TestPoison:
    async def test_malformed_message_goes_straight_to_the_dead_letter_queue(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        await publish_raw(amqp_url, b"{not json", message_id="by-hand-1")

        [message] = await dead_letters(rabbit_admin, vhost)

        assert message["payload"] == "{not json"
        assert message["properties"]["message_id"] == "by-hand-1"
        message_headers = message["properties"]["headers"]
        assert message_headers[ATTEMPT_HEADER] == 1
        assert message_headers[ERROR_TYPE_HEADER] == "PoisonMessage"
        assert message_headers["x-death"][0]["reason"] == "expired"
        # The worker carries on with the next campaign.
        campaign = await create_campaign(campaign_client, headers, "after the poison")
        assert steps(await wait_for_jobs(campaign_client, headers, campaign["id"])) == [
            ("success", 1)
        ]

    @pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
    async def test_a_body_that_is_not_what_it_claims_is_dead_lettered(
        self,
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        worker: FastAPI,
        content_type: str | None,
    ) -> None:
        await publish_raw(amqp_url, b"\xff{not json", content_type=content_type)

        [message] = await dead_letters(rabbit_admin, vhost)
        seen = await handled(worker, poison=1)

        assert message["properties"]["headers"][ERROR_TYPE_HEADER] == "PoisonMessage"
        assert seen["poison"] == 1
        assert await value(worker, "worker_messages_in_flight") == 0

    @pytest.mark.parametrize(
        "change",
        [
            {"event_id": "not-a-uuid"},
            {"tenant_id": None},
            {"schema_version": 99},
            {"occurred_at": "yesterday"},
        ],
    )
    async def test_invalid_event_is_poison(
        self,
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        tenant: str,
        change: dict[str, Any],
    ) -> None:
        event = CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name="x")
        body = {**event.model_dump(mode="json"), **change}

        await publish_raw(amqp_url, json.dumps(body).encode(), message_id=str(event.event_id))
        [message] = await dead_letters(rabbit_admin, vhost)

        assert message["properties"]["headers"][ERROR_TYPE_HEADER] == "PoisonMessage"

    async def test_event_for_an_unknown_campaign_is_poison(
        self,
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        tenant: str,
        db: asyncpg.Connection,
        executions: list[CampaignCreated],
    ) -> None:
        event = CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name="ghost")

        await publish_raw(amqp_url, event.model_dump_json().encode())
        [message] = await dead_letters(rabbit_admin, vhost)

        assert "no such campaign" in message["properties"]["headers"][ERROR_MESSAGE_HEADER]
        assert executions == []  # found out before running anything
        rows = await db.fetchval(
            "SELECT count(*) FROM campaign_job_logs WHERE event_id = $1", event.event_id
        )
        assert rows == 0

    async def test_event_naming_another_tenants_campaign_is_poison(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        other_tenant: str,
        executions: list[CampaignCreated],
    ) -> None:
        campaign = await create_campaign(campaign_client, headers, "mine")
        await wait_for_jobs(campaign_client, headers, campaign["id"])
        forged = CampaignCreated(
            tenant_id=other_tenant, campaign_id=uuid.UUID(campaign["id"]), name="forged"
        )

        await publish_raw(amqp_url, forged.model_dump_json().encode())
        await dead_letters(rabbit_admin, vhost)

        assert steps(await jobs_of(campaign_client, headers, campaign["id"])) == [("success", 1)]
        # Another tenant's campaign is never run on a forged event's say-so.
        assert forged.event_id not in {event.event_id for event in executions}

    async def test_an_event_whose_row_the_database_refuses_is_dead_lettered_alone(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        db: asyncpg.Connection,
    ) -> None:
        # A forged event for a real campaign, with a NUL character that jsonb refuses, sent
        # between two good events: it is dead-lettered at once with the reason, not requeued
        # until the delivery limit, and the good ones get their rows.
        made = [await unprocessed(campaign_client, headers, db, f"good {i}") for i in range(2)]
        good, jobs = [campaign for campaign, _ in made], [job for _, job in made]
        forged = {**jobs[0]["payload"], "event_id": str(uuid.uuid4()), "name": "bad\u0000name"}

        await publish_raw(amqp_url, json.dumps(jobs[0]["payload"]).encode())
        await publish_raw(amqp_url, json.dumps(forged).encode())
        await publish_raw(amqp_url, json.dumps(jobs[1]["payload"]).encode())
        [message] = await dead_letters(rabbit_admin, vhost)

        assert message["properties"]["headers"][ERROR_TYPE_HEADER] == "PoisonMessage"
        assert "refuses" in message["properties"]["headers"][ERROR_MESSAGE_HEADER]
        assert message["properties"]["headers"]["x-death"][0]["count"] == 1
        for campaign in good:
            assert steps(await wait_for_jobs(campaign_client, headers, campaign["id"])) == [
                ("success", 1)
            ]


class TestOddHeaders:
    @pytest.mark.parametrize(
        "odd",
        [{"traceparent": 12345}, {"x-attempt": "many"}],
        ids=["traceparent-not-text", "attempt-not-a-number"],
    )
    async def test_an_event_with_odd_headers_is_processed(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        db: asyncpg.Connection,
        odd: dict[str, Any],
    ) -> None:
        campaign, job = await unprocessed(campaign_client, headers, db, "odd headers")

        await publish_raw(amqp_url, json.dumps(job["payload"]).encode(), headers=odd)
        jobs = await wait_for_jobs(campaign_client, headers, campaign["id"])

        assert steps(jobs) == [("success", 1)]  # a header it cannot read counts as attempt 1
        queue = await eventually(
            lambda: rabbit_admin.queue(vhost, "worker.campaign.created"),
            until=lambda q: q.get("messages_unacknowledged") == 0,
            timeout=15,
            what="nothing left unacknowledged",
        )
        assert queue["messages_unacknowledged"] == 0


class TestDuplicates:
    async def test_the_same_event_three_times_gives_one_success(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        worker: FastAPI,
        db: asyncpg.Connection,
    ) -> None:
        campaign = await create_campaign(campaign_client, headers, "once")
        [job] = await wait_for_jobs(campaign_client, headers, campaign["id"])
        body = json.dumps(job["payload"]).encode()

        for _ in range(2):
            await publish_raw(amqp_url, body, message_id=job["event_id"])
        seen = await handled(worker, duplicate=2)

        assert steps(await jobs_of(campaign_client, headers, campaign["id"])) == [("success", 1)]
        assert await rabbit_admin.peek(vhost, "campaign.deadletter") == []
        successes = await db.fetchval(
            "SELECT count(*) FROM campaign_job_logs WHERE event_id = $1 AND status = 'success'",
            uuid.UUID(job["event_id"]),
        )
        assert successes == 1
        assert (seen["success"], seen["duplicate"]) == (1, 2)

    async def test_concurrent_duplicates_give_one_success(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        worker: FastAPI,
        tenant: str,
        db: asyncpg.Connection,
    ) -> None:
        # The campaign exists but its event was never processed: ten copies arrive at once and
        # race each other through the worker (prefetch 10), not one after another.
        campaign, job = await unprocessed(campaign_client, headers, db, "racing")
        body = json.dumps(job["payload"]).encode()

        for _ in range(10):
            await publish_raw(amqp_url, body, message_id=job["event_id"])
        seen = await handled(worker, success=2, duplicate=9)

        assert steps(await jobs_of(campaign_client, headers, campaign["id"])) == [("success", 1)]
        assert seen["success"] == 2  # the first delivery, and one of the ten copies
        assert seen["duplicate"] == 9
        assert await rabbit_admin.peek(vhost, "campaign.deadletter") == []


class TestRefusedCopies:
    async def test_a_retry_the_broker_refuses_is_an_error_on_the_deliverys_span(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        spans: Spans,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # Every retry copy goes to a queue that does not exist: the mandatory publish comes back.
        monkeypatch.setattr(worker_processing, "retry_queue", lambda _: RabbitQueue("nowhere"))
        monkeypatch.setattr(
            worker_processing, "tracer", spans.provider.get_tracer("worker.processing")
        )

        campaign = await create_campaign(campaign_client, headers, "Refused [fail:1]")

        def refused() -> list[ReadableSpan]:
            return [
                span
                for span in spans.of_kind(SpanKind.CONSUMER)
                if (span.attributes or {}).get("campaign.id") == campaign["id"]
                and span.status.status_code is StatusCode.ERROR
            ]

        async def probe() -> list[ReadableSpan]:
            return refused()

        [span, *_] = await eventually(probe, what="a process span with the refusal")
        assert span.status.description is not None
        assert "NO_ROUTE" in span.status.description
        [exception] = [event for event in span.events if event.name == "exception"]
        assert exception.attributes is not None
        assert "NO_ROUTE" in str(exception.attributes["exception.message"])
        # The original went back to the queue, not acknowledged: it is redelivered.
        assert (span.attributes or {}).get("campaign.outcome") == "requeued"


class TestUnsampledTraces:
    async def test_an_unsampled_campaign_keeps_its_trace_id_in_its_row_and_log_lines(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        worker: FastAPI,
        db: asyncpg.Connection,
        spans: Spans,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # As under OTEL_TRACES_SAMPLER=parentbased_traceidratio, for a request the ratio left
        # out: the traceparent says "not sampled" (flags 00), and the worker follows it.
        monkeypatch.setattr(
            worker_processing, "tracer", spans.provider.get_tracer("worker.processing")
        )
        campaign, job = await unprocessed(campaign_client, headers, db, "unsampled")
        trace_id = uuid.uuid4().hex
        traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-00"
        body = json.dumps(job["payload"]).encode()

        caplog.clear()
        with caplog.at_level("INFO", logger="worker.processing"):
            await publish_raw(
                amqp_url, body, message_id=job["event_id"], headers={"traceparent": traceparent}
            )
            [row] = await wait_for_jobs(campaign_client, headers, campaign["id"])

        assert row["trace_id"] == trace_id
        lines = [
            r
            for r in caplog.records
            if r.name == "worker.processing" and getattr(r, "event_id", None) == job["event_id"]
        ]
        assert lines
        assert {getattr(r, "trace_id", None) for r in lines} == {trace_id}
        # Nothing of this delivery was recorded as a span.
        assert not [
            s
            for s in spans.finished()
            if s.context is not None and s.context.trace_id == int(trace_id, 16)
        ]
