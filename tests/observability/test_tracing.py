"""One trace per campaign, from the HTTP request to the worker's row, through the real exporter."""

from __future__ import annotations

from typing import Any

import httpx

from tests.observability.conftest import Stack
from tests.support.campaigns import create_campaign, wait_for_jobs
from tests.support.otlp import ReceivedSpan
from tests.support.polling import eventually


def statement(span: ReceivedSpan) -> str:
    text = span.attributes.get("db.statement") or span.attributes.get("db.query.text") or ""
    return str(text)


def ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    by_id = {candidate.span_id: candidate for candidate in spans}
    chain = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain


def one(spans: list[ReceivedSpan], **where: Any) -> ReceivedSpan:
    found = [span for span in spans if all(getattr(span, k) == v for k, v in where.items())]
    assert len(found) == 1, (where, [(s.service, s.kind, s.name) for s in spans])
    return found[0]


PUBLISH = "campaigns.campaign.created publish"


def publishes(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    """campaign_service's publish spans that ended well: a publish the broker did not confirm
    (a relay pass racing a reconnect) is retried, leaving a failed span."""
    return [
        span
        for span in spans
        if span.service == "campaign_service"
        and span.kind == "PRODUCER"
        and span.name == PUBLISH
        and span.status != "ERROR"
    ]


def job_log_insert(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [
        span
        for span in spans
        if span.service == "worker" and "INSERT INTO campaign_job_logs" in statement(span)
    ]


def processes(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [
        span
        for span in spans
        if span.service == "worker"
        and span.kind == "CONSUMER"
        and span.name == "campaigns.campaign.created process"
    ]


async def complete_trace(stack: Stack, trace_id: str, inserts: int = 1) -> list[ReceivedSpan]:
    """The trace once the worker's row insert(s) and process span(s), the HTTP server span and
    the publish spans have arrived."""

    async def spans() -> list[ReceivedSpan]:
        return stack.receiver.trace(trace_id)

    return await eventually(
        spans,
        until=lambda found: (
            len(job_log_insert(found)) >= inserts
            # A delivery's process span ends after its row's insert span: it can come in the
            # worker's next export.
            and len(processes(found)) >= inserts
            and any(span.kind == "SERVER" for span in found)
            # Each process exports on its own schedule: wait for the publish span too.
            and len(publishes(found)) >= 1
        ),
        timeout=15,
        what=f"trace {trace_id}",
    )


def assert_request_to_row_chain(spans: list[ReceivedSpan], event_id: str) -> None:
    server = one(spans, service="campaign_service", kind="SERVER")
    assert server.parent_span_id is None
    assert server.attributes.get("http.route") == "/campaigns"
    assert server.name == "POST /campaigns"

    # One statement writes the campaign's row and its event's outbox row (the SQLAlchemy
    # instrumentation's span, named by the statement's first word and the database).
    [insert] = [
        span
        for span in spans
        if span.service == "campaign_service" and "INSERT INTO campaigns " in statement(span)
    ]
    assert "INSERT INTO outbox " in statement(insert)
    assert insert.kind == "CLIENT"
    assert insert.attributes["db.system"] == "postgresql"
    assert server in ancestors(insert, spans)

    [publish] = publishes(spans)
    assert server in ancestors(publish, spans)
    assert publish.attributes["messaging.system"] == "rabbitmq"
    assert publish.attributes["messaging.destination.name"] == "campaigns"
    assert publish.attributes["messaging.rabbitmq.destination.routing_key"] == "campaign.created"

    # FastStream's middleware makes a "create" span, the publish span's parent, and carries its
    # context in the message: the consumer's parent.
    [process] = processes(spans)
    [create] = [span for span in spans if span.span_id == process.parent_span_id]
    assert (create.service, create.kind, create.name) == (
        "campaign_service",
        "PRODUCER",
        "campaigns.campaign.created create",
    )
    assert publish.parent_span_id == create.span_id
    assert server in ancestors(process, spans)
    assert process.attributes["messaging.system"] == "rabbitmq"
    assert process.attributes["messaging.message.id"] == event_id
    assert process.attributes["messaging.rabbitmq.destination.routing_key"] == "campaign.created"

    [row_insert] = job_log_insert(spans)
    assert row_insert.kind == "CLIENT"
    assert process in ancestors(row_insert, spans)
    assert row_insert.attributes["campaign.recorded"] == "written"
    assert row_insert.attributes["db.batch.size"] >= 1


class TestOneTracePerCampaign:
    async def test_from_the_http_request_to_the_workers_row(
        self, stack: Stack, tenant: str
    ) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            campaign = await create_campaign(client, headers, "traced")
            [job] = await wait_for_jobs(client, headers, campaign["id"])

        assert job["trace_id"] is not None
        assert len(job["trace_id"]) == 32
        spans = await complete_trace(stack, job["trace_id"])
        assert_request_to_row_chain(spans, job["event_id"])
        # A create and a publish span for the one publish; a publish the broker did not confirm
        # in time would be retried, leaving a span of its own marked as an error.
        producers = [s for s in spans if s.kind == "PRODUCER" and s.status != "ERROR"]
        assert {span.name for span in producers} == {
            "campaigns.campaign.created create",
            PUBLISH,
        }

    async def test_also_when_published_after_a_broker_outage(
        self, stack: Stack, tenant: str
    ) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            await stack.node.stop_app()
            try:
                campaign = await create_campaign(client, headers, "traced through an outage")
            finally:
                await stack.node.start_app()
            [job] = await wait_for_jobs(client, headers, campaign["id"], timeout=40)

        spans = await complete_trace(stack, job["trace_id"])
        assert_request_to_row_chain(spans, job["event_id"])

    async def test_every_retry_and_the_dead_lettering_are_in_the_same_trace(
        self, stack: Stack, tenant: str
    ) -> None:
        headers = await stack.login(tenant)
        async with httpx.AsyncClient(base_url=stack.campaigns.url) as client:
            campaign = await create_campaign(client, headers, "doomed [fail:always]")
            jobs = await wait_for_jobs(client, headers, campaign["id"], final="failed")

        assert [job["status"] for job in jobs] == ["retry", "retry", "failed"]
        trace_ids = {job["trace_id"] for job in jobs}
        assert len(trace_ids) == 1
        [trace_id] = trace_ids
        spans = await eventually(
            lambda: _with_dead_letter(stack, trace_id), timeout=15, what="dead-lettering span"
        )
        attempts = sorted(
            span.attributes["campaign.attempt"]
            for span in spans
            if span.kind == "CONSUMER" and "campaign.attempt" in span.attributes
        )
        assert attempts == [1, 2, 3]
        retry_publishes = [
            span
            for span in spans
            if span.service == "worker"
            and span.kind == "PRODUCER"
            and span.name.endswith(" publish")
            and str(
                span.attributes.get("messaging.rabbitmq.destination.routing_key", "")
            ).startswith("worker.campaign.created.retry.")
        ]
        assert len(retry_publishes) == 2
        assert len(job_log_insert(spans)) == 3
        [dead] = [span for span in spans if "dead-lettered" in span.events]
        assert dead.service == "worker"
        assert any("dead-letter requested" in span.events for span in spans)


async def _with_dead_letter(stack: Stack, trace_id: str) -> list[ReceivedSpan]:
    spans = stack.receiver.trace(trace_id)
    return spans if any("dead-lettered" in span.events for span in spans) else []
