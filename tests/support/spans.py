"""Spans recorded in memory by a tracer provider of a test's own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind


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
