"""Spans of every kind, field and value (resources, scopes, events, links, limits, status,
trace state, remote parents), as the SDK and the platform's own tracer make them: what the OTLP
encoding and the span export process are checked against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from shared import spans

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

VALUES: dict[str, AttributeValue] = {
    "text": "rabbitmq",
    "empty": "",
    "unicode": "naïve ✓ 東京",
    "long": "x" * 20_000,  # a length that takes three bytes to write
    "true": True,
    "false": False,
    "zero": 0,
    "negative": -1,
    "int64.max": 2**63 - 1,
    "int64.min": -(2**63),
    "float.zero": 0.0,
    "float": -1.5,
    "float.huge": 1e300,
    "texts": ("a", "", "ü"),
    "ints": (1, -2, 2**40),
    "floats": (0.5, -0.0),
    "bools": (True, False),
    "none.of.them": (),
    "bytes": b"\x00\xff raw",
}


def provider_for(resource: Resource, exporter: InMemorySpanExporter) -> TracerProvider:
    limits = SpanLimits(max_span_attributes=len(VALUES), max_events=3, max_links=2)
    provider = TracerProvider(resource=resource, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@contextmanager
def every_kind_of_span() -> Iterator[list[ReadableSpan]]:
    """Spans of every kind, field and value, from two resources and several scopes, their
    resources and scopes interleaved."""
    exporter = InMemorySpanExporter()
    service = provider_for(
        Resource({"service.name": "campaign_service", "service.instance.id": 7}),
        exporter,
    )
    other = provider_for(
        Resource({"service.name": "worker", "host.cores": 2}, schema_url="https://x.test/1.2"),
        exporter,
    )
    web = service.get_tracer("web", "1.0", schema_url="https://x.test/1.1")
    db = service.get_tracer("db", attributes={"scope.kind": "driver", "scope.level": 3})
    unnamed = other.get_tracer("")
    remote = trace.get_current_span(propagate.extract({"traceparent": TRACEPARENT}))
    state = trace.TraceState([("vendor", "value"), ("other", "1")])
    with_state = trace.NonRecordingSpan(
        trace.SpanContext(
            0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(1), trace_state=state
        )
    )

    with web.start_as_current_span("POST /campaigns", kind=SpanKind.SERVER) as root:
        root.set_attributes(VALUES)
        root.set_attribute("one.too.many", "dropped")
        for n in range(5):  # two more than the limit
            root.add_event(f"event {n}", {"n": n} if n % 2 else None)
        root.add_event("timed", timestamp=1_700_000_000_000_000_123)
        db.start_span("INSERT campaigns", kind=SpanKind.CLIENT).end()
        with web.start_as_current_span("", kind=SpanKind.PRODUCER) as unnamed_span:
            unnamed_span.set_status(Status(StatusCode.OK))
        db.start_span("SELECT", attributes={"db.system": "postgresql"}).end()
    unnamed.start_span(
        "campaigns.campaign.created process",
        context=trace.set_span_in_context(remote),
        kind=SpanKind.CONSUMER,
        links=[
            Link(remote.get_span_context(), {"link.kind": "follows"}),
            Link(with_state.get_span_context()),
            Link(root.get_span_context()),  # over the limit of two
        ],
    ).end()
    failed = web.start_span("failed", context=trace.set_span_in_context(with_state))
    failed.set_status(Status(StatusCode.ERROR, "campaign failed: ünknown"))
    failed.end()
    errored = web.start_span("errored", kind=SpanKind.INTERNAL)
    errored.set_status(Status(StatusCode.ERROR))
    errored.end()
    # And one of the platform's own, lighter spans (shared/spans.py), as the worker makes them.
    lean = spans.tracer("worker.processing", other).start_span(
        "INSERT campaign_job_logs",
        context=trace.set_span_in_context(remote),
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "rabbitmq", "campaign.attempt": 2},
    )
    lean.add_event("dead-lettered", {"messaging.destination.name": "campaign.deadletter"})
    lean.end()
    yield list(exporter.get_finished_spans())
    service.shutdown()
    other.shutdown()
