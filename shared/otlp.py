"""OTLP/HTTP span export that encodes the request itself, straight to protobuf bytes.

The SDK's exporter builds a generated protobuf object for every span, attribute and value, then
serializes them, and groups spans by hashing their resource (a JSON dump of its attributes) once
per span. On this platform's hot paths (a process span and a row insert span for every delivery,
several spans for every request) that encoding was the largest single cost of tracing: about
three times what this module spends writing the same bytes directly.

The bytes are the same as the SDK's for every span the SDK makes: ``encode_spans(spans) ==
SDK encode_spans(spans).SerializeToString()``, field for field, which
``tests/shared/test_otlp.py`` checks on spans of every kind. (A hand-built span with values of
the wrong types, a bytes name or no status, can differ or fail.) Everything else (endpoint,
headers, compression, timeout, retries, the request size limit, the exporter's own metrics) is
the SDK exporter's, configured by the same ``OTEL_*`` variables.

Wire format: https://protobuf.dev/programming-guides/encoding/, messages from
``opentelemetry/proto/trace/v1/trace.proto`` and ``common/v1/common.proto``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http._common import (
    RequestPayloadTooLargeError,
    _is_request_too_large,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode

logger = logging.getLogger(__name__)

_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64 = 2**64 - 1

# trace.proto's Span.SpanKind.
_KIND = {
    SpanKind.INTERNAL: b"\x30\x01",
    SpanKind.SERVER: b"\x30\x02",
    SpanKind.CLIENT: b"\x30\x03",
    SpanKind.PRODUCER: b"\x30\x04",
    SpanKind.CONSUMER: b"\x30\x05",
}
# SpanFlags: the parent's remoteness is known (0x100), and it is remote (0x200).
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_EMPTY_STATUS = b"\x7a\x00"  # the SDK always sends a status, empty when it is unset


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    size = len(payload)
    return tag + (bytes((size,)) if size < 0x80 else _varint(size)) + payload


def _text(tag: bytes, text: str | None) -> bytes:
    """A string field, left out when empty (proto3 does not send defaults)."""
    return _field(tag, text.encode()) if text else b""


# KeyValue.key and Span.name fields: a process uses few distinct attribute and span names.
_keys: dict[str, bytes] = {}
_names: dict[str, bytes] = {}


def _cached_text(cache: dict[str, bytes], tag: bytes, text: str) -> bytes:
    """A string field, written once per text (up to 4,096 texts a cache)."""
    encoded = cache.get(text)
    if encoded is None:
        encoded = _text(tag, text)
        if len(cache) < 4096:
            cache[text] = encoded
    return encoded


def _any_value(value: Any) -> bytes:
    """AnyValue, tried in the order the SDK's encoder tries the types."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is int:
        return _int_value(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return _int_value(value)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if isinstance(value, Mapping):
        pairs = [
            _field(b"\x0a", _cached_text(_keys, b"\x0a", str(k)) + _field(b"\x12", _any_value(v)))
            for k, v in value.items()
        ]
        return _field(b"\x32", b"".join(pairs))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _int_value(value: int) -> bytes:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} is out of the range of a 64-bit integer")
    return b"\x18" + _varint(value & _UINT64)


# Text attributes, encoded whole (field tag, key and value): most of a span's attributes are the
# same few pairs again and again (a statement's text, a system's name, an outcome). Emptied when
# full, since ids and other one-off values fill it too; long texts (a stack trace) stay out.
_text_pairs: dict[tuple[bytes, str, str], bytes] = {}
_TEXT_PAIRS_MAX = 4096
_TEXT_PAIR_LONGEST = 2048


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated KeyValue. An attribute that cannot be encoded is left out (and logged), as the
    SDK's encoder does."""
    if not attributes:
        return b""
    encoded = []
    for key, value in attributes.items():
        text = type(value) is str and len(value) <= _TEXT_PAIR_LONGEST
        if text and (field := _text_pairs.get((tag, key, value))) is not None:
            encoded.append(field)
            continue
        try:
            key_field = _cached_text(_keys, b"\x0a", key)
            field = _field(tag, key_field + _field(b"\x12", _any_value(value)))
        except Exception:
            logger.exception("Failed to encode key %s", key)
            continue
        if text:
            if len(_text_pairs) >= _TEXT_PAIRS_MAX:
                _text_pairs.clear()
            _text_pairs[tag, key, value] = field
        encoded.append(field)
    return b"".join(encoded)


def _flags(parent: SpanContext | None) -> bytes:
    remote = parent is not None and parent.is_remote
    return _fixed32(_HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE)


_SPAN_FLAGS = {
    remote: b"\x85\x01" + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE)
    for remote in (False, True)
}


def _span(span: ReadableSpan) -> bytes:
    context = span.get_span_context()
    if context is None:  # only a span that was never started has none
        raise ValueError(f"span {span.name!r} has no context")
    parts = [
        b"\x0a\x10"
        + context.trace_id.to_bytes(16, "big")
        + b"\x12\x08"
        + context.span_id.to_bytes(8, "big")
    ]
    trace_state = context.trace_state
    if trace_state:
        parts.append(_text(b"\x1a", ",".join([f"{k}={v}" for k, v in trace_state.items()])))
    parent = span.parent
    if parent:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_cached_text(_names, b"\x2a", span.name) + _KIND[span.kind])
    start_time, end_time = span.start_time, span.end_time
    if start_time:
        parts.append(b"\x39" + _fixed64(start_time))
    if end_time:
        parts.append(b"\x41" + _fixed64(end_time))
    parts.append(_attributes(b"\x4a", span.attributes))
    if dropped := span.dropped_attributes:
        parts.append(b"\x50" + _varint(dropped))
    for event in span.events:
        parts.append(_field(b"\x5a", _event(event)))
    if dropped := span.dropped_events:
        parts.append(b"\x60" + _varint(dropped))
    for link in span.links:
        parts.append(_field(b"\x6a", _link(link)))
    if dropped := span.dropped_links:
        parts.append(b"\x70" + _varint(dropped))
    status = span.status
    if status.status_code is StatusCode.UNSET and not status.description:
        parts.append(_EMPTY_STATUS)
    else:
        code = status.status_code.value
        detail = _text(b"\x12", status.description) + (b"\x18" + _varint(code) if code else b"")
        parts.append(_field(b"\x7a", detail))
    parts.append(_SPAN_FLAGS[parent is not None and parent.is_remote])
    return b"".join(parts)


def _event(event: Event) -> bytes:
    parts = [b"\x09" + _fixed64(event.timestamp)] if event.timestamp else []
    parts.append(_text(b"\x12", event.name))
    parts.append(_attributes(b"\x1a", event.attributes))
    if event.dropped_attributes:
        parts.append(b"\x20" + _varint(event.dropped_attributes))
    return b"".join(parts)


def _link(link: Link) -> bytes:
    # The SDK's encoder does not send a link's trace state; neither does this one.
    context = link.context
    parts = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        _attributes(b"\x22", link.attributes),
    ]
    if link.dropped_attributes:
        parts.append(b"\x28" + _varint(link.dropped_attributes))
    parts.append(b"\x35" + _flags(context))
    return b"".join(parts)


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    return (
        _text(b"\x0a", scope.name)
        + _text(b"\x12", scope.version)
        + _attributes(b"\x1a", scope.attributes)
    )


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """An ExportTraceServiceRequest for the spans, serialized: spans grouped by resource, then
    by instrumentation scope, each group in the order its first span came."""
    groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    last_resource: Resource | None = None
    last_scope: InstrumentationScope | None = None
    scopes: dict[InstrumentationScope | None, list[bytes]] = {}
    encoded: list[bytes] = []
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope or None
        # Consecutive spans nearly always share both: hash (a JSON dump for a resource) only
        # when they change.
        if resource is not last_resource:
            scopes = groups.setdefault(resource, {})
            encoded = scopes.setdefault(scope, [])
            last_resource, last_scope = resource, scope
        elif scope is not last_scope:
            encoded = scopes.setdefault(scope, [])
            last_scope = scope
        encoded.append(_field(b"\x12", _span(span)))

    request = []
    for resource, by_scope in groups.items():
        scope_spans = [
            _field(
                b"\x12",
                _field(b"\x0a", _scope(scope))
                + b"".join(spans_of_scope)
                + _text(b"\x1a", scope.schema_url if scope else None),
            )
            for scope, spans_of_scope in by_scope.items()
        ]
        resource_spans = (
            _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
            + b"".join(scope_spans)
            + _text(b"\x1a", resource.schema_url)
        )
        request.append(_field(b"\x0a", resource_spans))
    return b"".join(request)


class DirectOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, with the request encoded by :func:`encode_spans`."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            logger.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            try:
                data = encode_spans(spans)
            except Exception as error:
                logger.exception("Failed to encode span batch")
                result.error = error
                return SpanExportResult.FAILURE
            if _is_request_too_large(data, self._max_request_size):
                logger.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size %d",
                    len(data),
                    self._max_request_size,
                )
                result.error = RequestPayloadTooLargeError(
                    f"Serialized span request size {len(data)} bytes exceeds max_request_size "
                    f"{self._max_request_size} bytes."
                )
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                if sent.status_code is not None:
                    result.error_attrs = {HTTP_RESPONSE_STATUS_CODE: sent.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:  # typed, for its callers; the SDK's is not
        super().shutdown()  # type: ignore[no-untyped-call]
