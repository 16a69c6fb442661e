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


def assert_publish_span_carried(
    span: ReadableSpan, headers: Mapping[str, Any], *, message_id: str
) -> None:
    """``span`` is the publish span of ``campaigns``/``campaign.created`` made in the
    :data:`STORED_TRACEPARENT` context, and ``headers`` (the message's) carry its own context."""
    assert span.name == "campaigns.campaign.created publish"
    assert span.kind is SpanKind.PRODUCER
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == STORED_TRACEPARENT[36:52]
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == message_id
    assert span.attributes["messaging.destination.name"] == "campaigns"
    carried = trace.get_current_span(propagate.extract(dict(headers))).get_span_context()
    assert span.context is not None
    assert (carried.trace_id, carried.span_id) == (span.context.trace_id, span.context.span_id)
