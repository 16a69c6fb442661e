"""Spans recorded in memory by a tracer provider of a test's own."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

# A W3C context stored with an outbox row, as the relay publishes in it.
STORED_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Spans:
    provider: TracerProvider
    exporter: InMemorySpanExporter

    def finished(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def of_kind(self, kind: SpanKind) -> list[ReadableSpan]:
        return [span for span in self.finished() if span.kind == kind]


@contextmanager
def recorded_spans() -> Iterator[Spans]:
    """A provider whose every span, once ended, is in ``finished()``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield Spans(provider, exporter)
    finally:
        provider.shutdown()


def assert_publish_span_carried(spans: Spans, headers: Mapping[str, Any]) -> None:
    """A publish span of ``campaigns``/``campaign.created`` was made in the
    :data:`STORED_TRACEPARENT` trace, and ``headers`` (the message's) carry the context of one of
    that publish's PRODUCER spans (the one its consumer continues)."""
    producers = spans.of_kind(SpanKind.PRODUCER)
    [publish] = [s for s in producers if s.name == "campaigns.campaign.created publish"]
    assert publish.context is not None
    assert format(publish.context.trace_id, "032x") == STORED_TRACEPARENT[3:35]
    assert publish.attributes is not None
    assert publish.attributes["messaging.destination.name"] == "campaigns"
    carried = trace.get_current_span(propagate.extract(dict(headers))).get_span_context()
    assert carried.trace_id == publish.context.trace_id
    assert carried.span_id in {s.context.span_id for s in producers if s.context is not None}
