"""A span as plain values, and back: what crosses the pipe between a service and its span export
process (``shared.span_export``).

A message is its length (``FRAME``), then ``marshal.dumps((kind, body))``: a batch of records
(``SPANS``; each a span, or the resource and scope later spans name by number, ``ORIGIN``) or a
flush token (``FLUSH``). :func:`record` makes a span's record on the service's side;
:func:`rebuild` makes the SDK's ``ReadableSpan`` of it again in the export process.
"""

from __future__ import annotations

import logging
import marshal
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

logger = logging.getLogger(__name__)

FRAME = struct.Struct("<I")  # each message: its length, then marshal.dumps((kind, body))
SPANS, ORIGIN, FLUSH = 0, 1, 2  # message kinds; a batch's records are spans or origins

# A span as it crosses the pipe: plain values marshal writes (attribute values are of the types
# OpenTelemetry allows: text, bool, int, float, bytes, and sequences and mappings of those).
Record = tuple[Any, ...]
Origins = dict[int, tuple[Resource, InstrumentationScope | None]]


# Values marshal writes only of their exact types: a subclass (a StrEnum member, an IntEnum,
# HTTPStatus) as an attribute value is written as its base type, as the OTLP encoder would.
_PLAIN = (bool, str, int, float, bytes)
_LEFT_OUT = object()


def _plain(value: Any) -> Any:
    if value is None or type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # (bool cannot be subclassed)
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, Mapping):
        pairs = ((str(key), _plain(item)) for key, item in value.items())
        return {key: item for key, item in pairs if item is not _LEFT_OUT}
    if isinstance(value, Sequence):
        return [item for item in map(_plain, value) if item is not _LEFT_OUT]
    return _LEFT_OUT  # not a value OpenTelemetry allows: left out, as the OTLP encoder does


def encode(kind: int, body: Any) -> bytes | None:
    """The message, framed; a body with values of other types than marshal's is written with
    their plain forms. None if even that cannot be written."""
    try:
        message = marshal.dumps((kind, body))
    except ValueError:
        try:
            message = marshal.dumps((kind, _plain(body)))
        except ValueError:
            return None
    return FRAME.pack(len(message)) + message


def describe(resource: Resource, scope: InstrumentationScope | None) -> tuple[Any, ...]:
    if scope is None:
        return dict(resource.attributes), resource.schema_url, None
    return (
        dict(resource.attributes),
        resource.schema_url,
        (scope.name, scope.version, scope.schema_url, dict(scope.attributes or {})),
    )


def record(span: ReadableSpan, context: SpanContext, origin: int) -> Record:
    parent = span.parent
    status = span.status
    attributes = span._attributes  # the span's own mapping: .attributes wraps it in a proxy
    if type(attributes) is not dict:
        attributes = dict(attributes or {})
    return (
        SPANS,
        origin,
        span.name,
        context.trace_id,
        context.span_id,
        int(context.trace_flags),
        list(context.trace_state.items()) if context.trace_state else None,
        None if parent is None else (parent.span_id, parent.is_remote),
        span.kind.value,
        span.start_time,
        span.end_time,
        attributes,
        span.dropped_attributes,
        [_event(event) for event in span.events] if span._events else None,
        span.dropped_events,
        [_link(link) for link in span.links] if span._links else None,
        span.dropped_links,
        status.status_code.value,
        status.description,
    )


def _event(event: Event) -> tuple[Any, ...]:
    attributes = dict(event.attributes) if event.attributes else None
    return event.name, attributes, event.timestamp, event.dropped_attributes


def _link(link: Link) -> tuple[Any, ...]:
    context = link.context
    attributes = dict(link.attributes) if link.attributes else None
    return (
        context.trace_id,
        context.span_id,
        int(context.trace_flags),
        context.is_remote,
        attributes,
        link.dropped_attributes,
    )


class _Span(ReadableSpan):
    """A span rebuilt from its record, with the counts of what its limits dropped."""

    def __init__(self, dropped: tuple[int, int, int], **fields: Any) -> None:
        super().__init__(**fields)
        self._dropped = dropped

    @property
    def dropped_attributes(self) -> int:
        return self._dropped[0]

    @property
    def dropped_events(self) -> int:
        return self._dropped[1]

    @property
    def dropped_links(self) -> int:
        return self._dropped[2]


class _Event(Event):
    def __init__(self, name: str, attributes: Any, timestamp: int, dropped: int) -> None:
        super().__init__(name, attributes, timestamp)
        self._dropped = dropped

    @property
    def dropped_attributes(self) -> int:
        return self._dropped


class _Link(Link):
    def __init__(self, context: SpanContext, attributes: Any, dropped: int) -> None:
        super().__init__(context, attributes)
        self._dropped = dropped

    @property
    def dropped_attributes(self) -> int:
        return self._dropped


_KINDS = {kind.value: kind for kind in SpanKind}
_STATUS = {code.value: code for code in StatusCode}


def rebuild(records: Iterable[Record], origins: Origins) -> list[ReadableSpan]:
    """The spans of a batch's records. A record that names a resource and scope (sent before
    the first span of theirs) goes into ``origins``, where the spans after it find them; a
    span whose origin never came is left out (and logged), not the batch it is in."""
    spans: list[ReadableSpan] = []
    unknown = 0
    for record in records:
        if record[0] == ORIGIN:
            origins[record[1]] = _origin(record[2:])
            continue
        if record[1] not in origins:
            unknown += 1
            continue
        (
            _,
            origin,
            name,
            trace_id,
            span_id,
            flags,
            trace_state,
            parent,
            kind,
            start_time,
            end_time,
            attributes,
            dropped_attributes,
            events,
            dropped_events,
            links,
            dropped_links,
            status_code,
            status_description,
        ) = record
        resource, scope = origins[origin]
        state = TraceState(trace_state) if trace_state else None
        context = SpanContext(trace_id, span_id, False, TraceFlags(flags), state)
        parent_context = None
        if parent is not None:
            parent_context = SpanContext(trace_id, parent[0], parent[1], TraceFlags(flags))
        code = _STATUS[status_code]
        spans.append(
            _Span(
                (dropped_attributes, dropped_events, dropped_links),
                name=name,
                context=context,
                parent=parent_context,
                resource=resource,
                attributes=attributes,
                events=[_Event(*event) for event in events or ()],
                links=[
                    _Link(SpanContext(t, s, r, TraceFlags(f)), a, d)
                    for t, s, f, r, a, d in links or ()
                ],
                kind=_KINDS[kind],
                status=Status(code, status_description),
                start_time=start_time,
                end_time=end_time,
                instrumentation_scope=scope,
            )
        )
    if unknown:
        logger.error("spans of an unknown resource and scope left out", extra={"spans": unknown})
    return spans


def _origin(description: Sequence[Any]) -> tuple[Resource, InstrumentationScope | None]:
    attributes, schema_url, scope = description
    resource = Resource(attributes, schema_url)
    if scope is None:
        return resource, None
    name, version, scope_schema_url, scope_attributes = scope
    return resource, InstrumentationScope(name, version, scope_schema_url, scope_attributes)


def messages(stream: IO[bytes]) -> Iterable[tuple[int, Any]]:
    while header := stream.read(FRAME.size):
        if len(header) < FRAME.size:
            return
        (size,) = FRAME.unpack(header)
        body = stream.read(size)
        if len(body) < size:
            return
        yield marshal.loads(body)  # noqa: S302  (from the parent process, over its own pipe)
