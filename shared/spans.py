"""The platform's own spans, made without the SDK's span class and handed to its export pipeline.

Every span the platform's code makes (the HTTP server spans, the statement spans, the publish
spans, the worker's process and row insert spans) comes from a tracer of :func:`tracer`. It
decides with the tracer provider's own sampler and ids, and hands each span, once ended, to the
provider's span processors as the SDK's ``ReadableSpan``. So ``OTEL_TRACES_SAMPLER``,
``OTEL_SDK_DISABLED``, the resource, the batch processor and the exporter apply as to any other
span, and an exporter cannot tell these spans from the SDK's.

Why not the SDK's ``Span``: it is built for spans shared between threads and set by any
library. Every attribute is checked and copied under a lock (twice: once when the span starts,
once into the snapshot the processors get when it ends), and every processor is called when it
starts. On this platform's hot paths (two spans for every delivery the worker takes, four for
every campaign created) that was the largest part of what tracing cost the event loop: starting
the worker's process span took about 45 µs, against about 5 µs here.

What these spans leave out, on purpose:
- span limits: the platform's spans carry a dozen attributes or fewer, set by its own code, of
  valid types;
- locks: a span is made, changed and ended by one task of one event loop, and nothing changes
  it once it has ended (the processors read it from then on);
- ``on_start``: the processors hear of a span when it ends (the batch processor, the only one
  the platform installs, does nothing on start);
- the SDK's internal span metrics (off unless ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``).

Anything else (a tracer provider that is not the SDK's, a disabled SDK) gets the provider's own
tracer, unchanged.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.exception_attributes import (
    EXCEPTION_ESCAPED,
    EXCEPTION_MESSAGE,
    EXCEPTION_STACKTRACE,
    EXCEPTION_TYPE,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

_UNSET = Status(StatusCode.UNSET)


def tracer(name: str, provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """A tracer for the platform's own spans: of ``provider``, or else of whichever provider the
    process has set when a span is started (module-level tracers are made before it is set)."""
    return _Tracer(name, provider)


class _Tracer(trace.Tracer):
    """Resolves to a :class:`LeanTracer` over the provider's SDK tracer, or to the provider's
    own tracer when it is not the SDK's (or the SDK is disabled)."""

    def __init__(self, name: str, provider: trace.TracerProvider | None) -> None:
        self._name = name
        self._fixed = provider
        self._provider: trace.TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()

    def _resolve(self) -> trace.Tracer:
        provider = self._fixed or trace.get_tracer_provider()
        if provider is not self._provider:
            resolved = provider.get_tracer(self._name)
            self._tracer = (
                LeanTracer(resolved) if isinstance(resolved, sdk_trace.Tracer) else resolved
            )
            self._provider = provider
        return self._tracer

    def start_span(  # type: ignore[override]  # the API's parameters, passed on
        self, name: str, context: context_api.Context | None = None, **options: Any
    ) -> trace.Span:
        return self._resolve().start_span(name, context, **options)

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, name: str, context: context_api.Context | None = None, **options: Any
    ) -> Iterator[trace.Span]:
        with self._resolve().start_as_current_span(name, context, **options) as span:
            yield span


class LeanTracer(trace.Tracer):
    """Starts spans as the SDK's tracer does (same sampler, ids, resource, scope and
    processors), of the lighter kind this module makes."""

    def __init__(self, sdk: sdk_trace.Tracer) -> None:
        self._sdk = sdk  # its resource is read per span: the SDK renews it in a forked child
        self._sampler: Sampler = sdk.sampler
        self._ids: IdGenerator = sdk.id_generator
        self._processor: SpanProcessor = sdk.span_processor
        self._scope: InstrumentationScope = sdk._instrumentation_scope

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if not self._sdk._is_enabled():  # a tracer the SDK's configurator turned off
            return trace.NonRecordingSpan(parent or trace.INVALID_SPAN_CONTEXT)
        links = [link for link in links if link.context.is_valid] if links else ()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self._ids.generate_trace_id()
            random_trace_id = self._ids.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_trace_id = parent.trace_flags.random_trace_id
        sampled = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = sampled.decision
        flags = TraceFlags.SAMPLED if decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT
        if random_trace_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=sampled.trace_state,
        )
        if decision is Decision.DROP:
            return trace.NonRecordingSpan(span_context)
        span = LeanSpan(
            name,
            span_context,
            parent,
            kind,
            # The sampler's attributes: those given, plus any it adds.
            dict(sampled.attributes),
            links,
            start_time or time.time_ns(),
            resource=self._sdk.resource,
            scope=self._scope,
            processor=self._processor,
        )
        span._record_exception = record_exception
        span._set_status_on_exception = set_status_on_exception
        return span

    @contextmanager  # a context manager only (the API's also decorates; nothing here does)
    def start_as_current_span(  # type: ignore[override]  # the API's, with its defaults
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span that is its own ``ReadableSpan``: what the processors get when it ends
    is the span itself, unchanged from then on (every setter does nothing once it has ended,
    as the SDK's do)."""

    _record_exception = True
    _set_status_on_exception = True

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        links: Sequence[Link],
        start_time: int,
        *,
        resource: Resource,
        scope: InstrumentationScope,
        processor: SpanProcessor,
    ) -> None:
        # ReadableSpan's fields, set directly: its __init__ would make a resource when none is
        # given, and read nothing else.
        self._name = name
        self._context = self._span_context = context
        self._parent = parent
        self._kind = kind
        self._attributes = self._values = attributes  # the same dict, typed as it is here
        self._events: list[Event] = []
        self._links = links
        self._start_time = start_time
        self._end_time: int | None = None
        self._status = _UNSET
        self._resource = resource
        self._instrumentation_scope = scope
        self._instrumentation_info = None
        self._processor = processor

    def get_span_context(self) -> SpanContext:
        return self._span_context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end_time is None:
            self._values[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self._end_time is None:
            self._values.update(attributes)

    def add_event(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: int | None = None,
    ) -> None:
        if self._end_time is None:
            self._events.append(Event(name, dict(attributes) if attributes else None, timestamp))

    def add_link(
        self, context: SpanContext, attributes: Mapping[str, AttributeValue] | None = None
    ) -> None:
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, Link(context, dict(attributes) if attributes else None))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK's: an OK status is final, and UNSET sets nothing.
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The exception as an ``exception`` event, with the attributes the SDK gives it."""
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        event: dict[str, AttributeValue] = {
            EXCEPTION_TYPE: f"{module}.{qualname}" if module and module != "builtins" else qualname,
            EXCEPTION_MESSAGE: str(exception),
            EXCEPTION_STACKTRACE: "".join(traceback.format_exception(exception)),
            EXCEPTION_ESCAPED: str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time or time.time_ns()
        self._processor.on_end(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # As the SDK's span used as a context manager: an exception leaving it is recorded.
        if exc_val is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(exc_val, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    def __repr__(self) -> str:
        return f'LeanSpan(name="{self._name}", context={self._context})'
