"""OpenTelemetry tracing, configured by the standard ``OTEL_*`` variables.

- ``OTEL_SERVICE_NAME`` (default: the service's own name), ``OTEL_RESOURCE_ATTRIBUTES``;
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default: parent-based, always on);
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: spans are exported
  over OTLP/HTTP (protobuf, encoded by ``shared/otlp.py``) when one is set; without one, spans
  still exist (trace ids reach the logs, the AMQP headers and the job rows) but are not sent
  anywhere;
- ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` turn export or tracing off;
- ``OTEL_BSP_*`` tune the export queue; its size defaults to 16,384 spans here (the SDK's 2,048
  is less than a burst of the worker's batches holds, and a full queue drops spans).

One trace per campaign: the HTTP server span (FastAPI instrumentation), the database spans
(asyncpg instrumentation), the publish span (:class:`RabbitTracing`, broker middleware, W3C
``traceparent`` in the AMQP headers), the worker's process span (``worker/processing.py``, from
those headers), and the job row's insert.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from faststream import BaseMiddleware, ContextRepo
from faststream.rabbit.response import RabbitPublishCommand
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.util.types import Attributes, AttributeValue

from shared.otlp import DirectOTLPSpanExporter

logger = logging.getLogger(__name__)

_provider: TracerProvider | None = None

# FastAPI's own OpenTelemetry layer (on by default once a tracer provider exists) would trace
# every request a second time: the platform uses opentelemetry-instrumentation-fastapi.
NO_NATIVE_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
# Probes and scrapes are not worth a trace each.
_UNTRACED_URLS = "health,ready,metrics"


def configure_tracing(service_name: str) -> TracerProvider:
    """The process's tracer provider (created once; later calls return it)."""
    global _provider
    if _provider is not None:
        return _provider
    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    sampler = _SkipTransactionControl(sampling._get_from_env_or_default())
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    if _exporting():
        provider.add_span_processor(
            BatchSpanProcessor(DirectOTLPSpanExporter(), max_queue_size=_export_queue_size())
        )
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # flush the last spans when the process ends
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _provider = provider
    logger.info(
        "tracing configured",
        extra={
            "exporting": _exporting(),
            "service_name": provider.resource.attributes.get(SERVICE_NAME),
        },
    )
    return provider


class _SkipTransactionControl(sampling.Sampler):
    """The configured sampler (OTEL_TRACES_SAMPLER), except that BEGIN, COMMIT, ROLLBACK and
    the driver's empty ping statement get no span: they carry nothing the statements between
    them do not show, and each span costs the process a little on a busy path."""

    _SKIPPED = frozenset({"BEGIN;", "COMMIT;", "ROLLBACK;", ";", "BEGIN", "COMMIT", "ROLLBACK"})

    def __init__(self, delegate: sampling.Sampler) -> None:
        self._delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> sampling.SamplingResult:
        if name in self._SKIPPED:
            return sampling.SamplingResult(sampling.Decision.DROP)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"SkipTransactionControl({self._delegate.get_description()})"


_EXPORT_QUEUE_SIZE = 16_384


def _export_queue_size() -> int | None:
    """The span queue's size: OTEL_BSP_MAX_QUEUE_SIZE when set (None lets the SDK read it),
    else a queue that holds a few of the worker's batches (two spans a delivery) while the
    exporter thread catches up."""
    return None if os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") else _EXPORT_QUEUE_SIZE


def _exporting() -> bool:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def instrument_app(app: FastAPI, provider: TracerProvider) -> None:
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=_UNTRACED_URLS,
        # One span per request: the ASGI layer's spans for each receive and send add nothing.
        exclude_spans=["receive", "send"],
    )


class RabbitTracing:
    """Broker middleware: a PRODUCER span for every publish (``<exchange>.<routing key>
    publish``, as FastStream names its own), with its W3C context in the message's AMQP headers,
    so the consumer's span is its child.

    One span a publish: FastStream's own telemetry middleware records a second ("create") for
    every message, which the trace does not need. Nothing on the platform consumes through a
    FastStream subscriber (the worker makes its own process spans), so there is no consume side.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer(__name__)

    def __call__(self, msg: Any | None, /, *, context: ContextRepo) -> _PublishSpan:
        return _PublishSpan(msg, context=context, tracer=self._tracer)


class _PublishSpan(BaseMiddleware[RabbitPublishCommand, Any]):
    def __init__(self, msg: Any | None, /, *, context: ContextRepo, tracer: trace.Tracer) -> None:
        super().__init__(msg, context=context)
        self._tracer = tracer

    async def publish_scope(
        self, call_next: Callable[[RabbitPublishCommand], Awaitable[Any]], cmd: RabbitPublishCommand
    ) -> Any:
        exchange = cmd.exchange.name
        attributes: dict[str, AttributeValue] = {
            SpanAttributes.MESSAGING_SYSTEM: "rabbitmq",
            SpanAttributes.MESSAGING_OPERATION: "publish",
            SpanAttributes.MESSAGING_DESTINATION_NAME: exchange,
            SpanAttributes.MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY: cmd.destination,
        }
        if message_id := cmd.message_options.get("message_id"):
            attributes[SpanAttributes.MESSAGING_MESSAGE_ID] = message_id
        if cmd.correlation_id:
            attributes[SpanAttributes.MESSAGING_MESSAGE_CONVERSATION_ID] = cmd.correlation_id
        with self._tracer.start_as_current_span(
            f"{exchange or 'default'}.{cmd.destination} publish",
            kind=trace.SpanKind.PRODUCER,
            attributes=attributes,
        ) as span:
            propagate.inject(cmd.headers)
            try:
                return await call_next(cmd)
            except asyncio.CancelledError:
                # A confirm that timed out (``asyncio.timeout`` cancels the publish) did not
                # publish either; the SDK marks only an Exception as an error.
                span.set_status(trace.StatusCode.ERROR, "cancelled: not confirmed in time")
                raise


def current_trace_context() -> dict[str, str]:
    """The active span's W3C context (``traceparent``, ``tracestate``), to carry elsewhere."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from(carrier: dict[str, Any]) -> Context:
    return propagate.extract(carrier)


def current_trace_id() -> str | None:
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
