"""The span export queue: large enough for the worker's bursts, and the standard variable wins."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from shared.telemetry import _export_queue_size


class _HeldBack(SpanExporter):
    """An exporter that cannot send until released, as when the event loop holds the CPU."""

    def __init__(self) -> None:
        self.exported = 0
        self.released = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.released.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


class TestExportQueue:
    def test_a_burst_of_the_workers_batches_loses_no_span(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("OTEL_BSP_MAX_QUEUE_SIZE", raising=False)
        exporter = _HeldBack()
        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(exporter, max_queue_size=_export_queue_size())
        )
        tracer = provider.get_tracer("burst")
        # Five batches of 500 deliveries, two spans each, ended while the exporter is stuck
        # (the SDK's own queue of 2,048 would drop more than half of them).
        for _ in range(5 * 500 * 2):
            tracer.start_span("delivery").end()
        exporter.released.set()
        provider.force_flush()
        provider.shutdown()

        assert exporter.exported == 5000

    def test_the_standard_variable_sets_the_size(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100")

        assert _export_queue_size() is None  # the SDK reads the variable itself
