"""The platform's OTLP encoding writes the bytes the SDK's encoder writes, for every kind of span,
and its exporter delivers them to an OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.otlp import DirectOTLPSpanExporter, encode_spans
from tests.support.otlp import OtlpReceiver
from tests.support.span_samples import TRACEPARENT, every_kind_of_span, provider_for


@pytest.fixture
def spans() -> Iterator[list[ReadableSpan]]:
    with every_kind_of_span() as made:
        yield made


class TestEncoding:
    def test_every_kind_of_span_is_written_as_the_sdk_writes_it(
        self, spans: list[ReadableSpan]
    ) -> None:
        expected = sdk_encode(spans)

        encoded = encode_spans(spans)

        assert encoded == expected.SerializeToString()
        assert ExportTraceServiceRequest.FromString(encoded) == expected

    def test_resources_and_scopes_are_grouped_as_the_sdk_groups_them(
        self, spans: list[ReadableSpan]
    ) -> None:
        request = ExportTraceServiceRequest.FromString(encode_spans(spans))

        groups = [
            (
                {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"],
                scope.scope.name,
                [span.name for span in scope.spans],
            )
            for resource in request.resource_spans
            for scope in resource.scope_spans
        ]
        assert groups == [
            ("campaign_service", "db", ["INSERT campaigns", "SELECT"]),
            ("campaign_service", "web", ["", "POST /campaigns", "failed", "errored"]),
            ("worker", "", ["campaigns.campaign.created process"]),
            ("worker", "worker.processing", ["INSERT campaign_job_logs"]),
        ]

    def test_what_was_dropped_is_counted(self, spans: list[ReadableSpan]) -> None:
        request = ExportTraceServiceRequest.FromString(encode_spans(spans))
        by_name = {
            span.name: span
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        }

        root = by_name["POST /campaigns"]
        assert (root.dropped_attributes_count, len(root.events), root.dropped_events_count) == (
            1,
            3,
            3,
        )
        consumer = by_name["campaigns.campaign.created process"]
        assert (len(consumer.links), consumer.dropped_links_count) == (2, 1)
        assert consumer.parent_span_id.hex() == "b7ad6b7169203331"

    def test_a_value_that_cannot_be_written_is_left_out_as_the_sdk_leaves_it_out(self) -> None:
        exporter = InMemorySpanExporter()
        provider = provider_for(Resource({"service.name": "x", "too.big": 2**64}), exporter)
        provider.get_tracer("t").start_span(
            "odd values", attributes={"too.big": 2**64, "surrogate": "a\udcff", "kept": 1}
        ).end()
        spans = exporter.get_finished_spans()

        encoded = encode_spans(spans)

        assert encoded == sdk_encode(spans).SerializeToString()
        request = ExportTraceServiceRequest.FromString(encoded)
        span = request.resource_spans[0].scope_spans[0].spans[0]
        assert [a.key for a in span.attributes] == ["kept"]
        assert [a.key for a in request.resource_spans[0].resource.attributes] == ["service.name"]

    def test_text_seen_before_and_text_past_the_reuse_cache_are_written_alike(self) -> None:
        """The same pairs in every context (span, event, resource), and more one-off values than
        the cache of encoded text attributes holds, so it is emptied on the way."""
        exporter = InMemorySpanExporter()
        provider = provider_for(Resource({"service.name": "worker", "db.system": "x"}), exporter)
        tracer = provider.get_tracer("t", attributes={"db.system": "x"})
        for n in range(3_000):
            same = {"db.system": "x", "campaign.outcome": "success"}
            span = tracer.start_span("process", attributes={**same, "campaign.id": f"id-{n}"})
            span.add_event("dead-lettered", {**same, "message.id": f"m-{n}"})
            span.end()
        spans = exporter.get_finished_spans()

        encoded = encode_spans(spans)

        assert encoded == sdk_encode(spans).SerializeToString()

    def test_no_spans_make_an_empty_request(self) -> None:
        assert encode_spans([]) == sdk_encode([]).SerializeToString() == b""


async def _export(
    spans: list[ReadableSpan],
    receiver: OtlpReceiver,
    path: str,
    compression: Compression = Compression.NoCompression,
) -> SpanExportResult:
    """Export the spans to the receiver's ``path``, from a thread as the span processor does."""
    async with receiver.running():
        exporter = DirectOTLPSpanExporter(
            endpoint=f"{receiver.endpoint}{path}", compression=compression
        )
        try:
            return await asyncio.to_thread(exporter.export, spans)
        finally:
            exporter.shutdown()


class TestExporter:
    @pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
    async def test_spans_reach_an_otlp_receiver(
        self, spans: list[ReadableSpan], compression: Compression
    ) -> None:
        receiver = OtlpReceiver()

        result = await _export(spans, receiver, "/v1/traces", compression)

        assert result is SpanExportResult.SUCCESS
        received = {span.name: span for span in receiver.spans}
        assert len(receiver.spans) == len(spans)
        assert received["campaigns.campaign.created process"].service == "worker"
        assert received["campaigns.campaign.created process"].trace_id == TRACEPARENT[3:35]
        assert received["POST /campaigns"].attributes["unicode"] == "naïve ✓ 東京"
        assert received["POST /campaigns"].attributes["ints"] == [1, -2, 2**40]
        assert received["failed"].status == "ERROR"

    async def test_a_receiver_that_refuses_is_a_failed_export(
        self, spans: list[ReadableSpan]
    ) -> None:
        receiver = OtlpReceiver()

        result = await _export(spans, receiver, "/v1/nothing-here")

        assert result is SpanExportResult.FAILURE
        assert receiver.spans == []

    def test_nothing_is_sent_after_shutdown(self, spans: list[ReadableSpan]) -> None:
        exporter = DirectOTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
        exporter.shutdown()

        assert exporter.export(spans) is SpanExportResult.FAILURE

    def test_a_request_over_the_size_limit_is_dropped(self, spans: list[ReadableSpan]) -> None:
        exporter = DirectOTLPSpanExporter(
            endpoint="http://127.0.0.1:9/v1/traces", max_request_size=1024
        )

        assert exporter.export(spans) is SpanExportResult.FAILURE
        exporter.shutdown()
