"""The platform's own spans (shared/spans.py): what reaches the exporter is what the SDK's own
span would have sent for the same calls, the provider's sampler decides, and nothing changes a
span once it has ended."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from shared.otlp import encode_spans
from shared.spans import LeanSpan
from shared.spans import tracer as lean_tracer
from tests.support.spans import Spans

REMOTE = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
)


def _calls(tracer: trace.Tracer) -> None:
    """What the platform's code does with spans: attributes at the start and later, events,
    a renamed span, an error status, an exception recorded, a remote parent."""
    parent = trace.set_span_in_context(NonRecordingSpan(REMOTE))
    span = tracer.start_span(
        "campaigns.campaign.created process",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "rabbitmq", "messaging.message.body.size": 310},
        start_time=1_000,
    )
    span.set_attributes({"campaign.attempt": 2, "tenant.id": "acme", "campaign.skip": None})
    span.set_attribute("campaign.retry", True)
    span.add_event("dead-letter requested", {"error.type": "SimulatedFailure"}, timestamp=1_500)
    child = tracer.start_span(
        "INSERT campaign_job_logs",
        context=trace.set_span_in_context(span),
        kind=SpanKind.CLIENT,
        attributes={"db.batch.size": 500, "db.statement": "INSERT INTO campaign_job_logs …"},
        start_time=1_100,
    )
    child.set_status(StatusCode.ERROR, "refused")
    child.end(end_time=1_200)
    span.update_name("campaigns.campaign.created process (renamed)")
    try:
        raise ValueError("not a campaign")
    except ValueError as exc:
        span.record_exception(exc, timestamp=1_800)
    span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=2_000)


class _Counting(IdGenerator):
    """Ids in a fixed order: the same calls get the same ids from either tracer."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def generate_span_id(self) -> int:
        return next(self._next)

    def generate_trace_id(self) -> int:
        return next(self._next)


def _exported(make: Callable[[TracerProvider], trace.Tracer]) -> tuple[ReadableSpan, ...]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "worker"}), id_generator=_Counting()
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _calls(make(provider))
    provider.shutdown()
    return exporter.get_finished_spans()


def _fields(span: ReadableSpan) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind,
        "context": span.get_span_context(),
        "parent": span.parent,
        "attributes": dict(span.attributes or {}),
        "events": [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events],
        "links": span.links,
        "status": (span.status.status_code, span.status.description),
        "times": (span.start_time, span.end_time),
        "resource": dict(span.resource.attributes),
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
    }


class TestSameAsTheSdk:
    def test_the_exporter_gets_what_the_sdk_span_would_have_sent(self) -> None:
        sdk = _exported(lambda provider: provider.get_tracer("worker.processing"))
        lean = _exported(lambda provider: lean_tracer("worker.processing", provider))

        assert all(isinstance(span, LeanSpan) for span in lean)
        assert [_fields(span) for span in lean] == [_fields(span) for span in sdk]

    def test_the_insert_is_the_child_of_the_process_span(self) -> None:
        insert, process = _exported(lambda provider: lean_tracer("worker", provider))

        assert insert.parent == process.get_span_context()
        assert process.parent == REMOTE

    def test_the_request_to_the_collector_is_the_same_bytes(self) -> None:
        sdk = _exported(lambda provider: provider.get_tracer("worker.processing"))
        lean = _exported(lambda provider: lean_tracer("worker.processing", provider))

        assert encode_spans(lean) == encode_spans(sdk)


class TestSampling:
    @pytest.fixture
    def sampled_by(self) -> Iterator[Callable[[sampling.Sampler], Spans]]:
        providers: list[TracerProvider] = []

        def make(sampler: sampling.Sampler) -> Spans:
            exporter = InMemorySpanExporter()
            provider = TracerProvider(sampler=sampler)
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            providers.append(provider)
            return Spans(provider, exporter)

        yield make
        for provider in providers:
            provider.shutdown()

    def test_an_unsampled_parent_makes_an_unrecorded_span_of_its_trace(
        self, sampled_by: Callable[[sampling.Sampler], Spans]
    ) -> None:
        recorded = sampled_by(sampling.ParentBased(sampling.ALWAYS_ON))
        unsampled = SpanContext(REMOTE.trace_id, REMOTE.span_id, is_remote=True)
        tracer = lean_tracer("worker", recorded.provider)

        span = tracer.start_span(
            "process", context=trace.set_span_in_context(NonRecordingSpan(unsampled))
        )
        span.end()

        assert isinstance(span, NonRecordingSpan)
        assert span.get_span_context().trace_id == REMOTE.trace_id  # logs still carry the trace
        assert not span.get_span_context().trace_flags.sampled
        assert recorded.finished() == ()

    def test_a_sampled_parent_makes_a_sampled_span(
        self, sampled_by: Callable[[sampling.Sampler], Spans]
    ) -> None:
        recorded = sampled_by(sampling.ParentBased(sampling.ALWAYS_OFF))
        tracer = lean_tracer("worker", recorded.provider)

        tracer.start_span(
            "process", context=trace.set_span_in_context(NonRecordingSpan(REMOTE))
        ).end()

        (span,) = recorded.finished()
        assert span.get_span_context().trace_flags.sampled  # type: ignore[union-attr]

    def test_a_root_the_ratio_leaves_out_is_not_recorded(
        self, sampled_by: Callable[[sampling.Sampler], Spans]
    ) -> None:
        recorded = sampled_by(sampling.TraceIdRatioBased(0.0))

        span = lean_tracer("api", recorded.provider).start_span("POST /campaigns")
        span.end()

        assert isinstance(span, NonRecordingSpan)
        assert recorded.finished() == ()

    def test_a_span_recorded_but_not_sampled_is_not_exported(
        self, sampled_by: Callable[[sampling.Sampler], Spans]
    ) -> None:
        class RecordOnly(sampling.Sampler):
            def should_sample(self, *args: Any, **kwargs: Any) -> sampling.SamplingResult:
                return sampling.SamplingResult(sampling.Decision.RECORD_ONLY, {"why": "local"})

            def get_description(self) -> str:
                return "RecordOnly"

        recorded = sampled_by(RecordOnly())

        span = lean_tracer("worker", recorded.provider).start_span("process")

        assert isinstance(span, LeanSpan)
        assert span.is_recording()
        assert not span.get_span_context().trace_flags.sampled
        assert dict(span.attributes or {}) == {"why": "local"}  # the sampler's attributes
        span.end()
        assert recorded.finished() == ()  # the processors export sampled spans only

    def test_a_disabled_sdk_makes_no_span(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))

        span = lean_tracer("worker", provider).start_span("process")
        span.end()

        assert not span.get_span_context().is_valid
        assert exporter.get_finished_spans() == ()


class TestLifecycle:
    def test_nothing_changes_a_span_once_it_has_ended(self, spans: Spans) -> None:
        tracer = lean_tracer("test", spans.provider)
        span = tracer.start_span("process", attributes={"campaign.outcome": "success"})
        span.end(end_time=5_000)

        span.set_attribute("campaign.outcome", "retry")
        span.set_attributes({"late": 1})
        span.add_event("late")
        span.update_name("renamed")
        span.set_status(StatusCode.ERROR)
        span.end(end_time=9_000)

        (finished,) = spans.finished()
        assert finished.name == "process"
        assert dict(finished.attributes or {}) == {"campaign.outcome": "success"}
        assert finished.events == ()
        assert finished.status.status_code is StatusCode.UNSET
        assert finished.end_time == 5_000

    def test_an_ok_status_is_final(self, spans: Spans) -> None:
        span = lean_tracer("test", spans.provider).start_span("publish")
        span.set_status(StatusCode.OK)
        span.set_status(StatusCode.ERROR, "too late")
        span.end()

        assert spans.finished()[0].status.status_code is StatusCode.OK

    def test_the_current_span_inside_and_an_escaping_exception_recorded(self, spans: Spans) -> None:
        tracer = lean_tracer("test", spans.provider)

        def publish() -> None:
            with tracer.start_as_current_span("publish") as span:
                assert trace.get_current_span() is span
                raise RuntimeError("broker away")

        with pytest.raises(RuntimeError):
            publish()

        (finished,) = spans.finished()
        assert finished.status.status_code is StatusCode.ERROR
        assert finished.status.description == "RuntimeError: broker away"
        (event,) = finished.events
        assert event.name == "exception"
        assert dict(event.attributes or {})["exception.type"] == "RuntimeError"

    def test_a_span_used_as_a_context_manager_records_what_escapes_it(self, spans: Spans) -> None:
        tracer = lean_tracer("test", spans.provider)

        def fail(*, record: bool) -> None:
            with tracer.start_span(
                "insert", record_exception=record, set_status_on_exception=record
            ):
                raise LookupError("no such row")

        with pytest.raises(LookupError):
            fail(record=True)
        with pytest.raises(LookupError):
            fail(record=False)

        recorded, quiet = spans.finished()
        assert (recorded.status.status_code, recorded.status.description) == (
            StatusCode.ERROR,
            "LookupError: no such row",
        )
        assert [event.name for event in recorded.events] == ["exception"]
        assert dict(recorded.events[0].attributes or {})["exception.escaped"] == "True"
        assert (quiet.status.status_code, quiet.events) == (StatusCode.UNSET, ())
        assert recorded.end_time is not None

    def test_a_tracer_without_a_provider_follows_the_one_the_process_sets(
        self, spans: Spans, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Module-level tracers are made at import, before the process sets its provider."""
        tracer = lean_tracer("worker.processing")
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: spans.provider)

        tracer.start_span("process").end()

        assert [span.name for span in spans.finished()] == ["process"]
