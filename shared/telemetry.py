"""OpenTelemetry tracing: the SDK and the instrumentations as shipped, configured by the standard
``OTEL_*`` variables.

- ``OTEL_SERVICE_NAME`` (default: the service's own name), ``OTEL_RESOURCE_ATTRIBUTES``;
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default: parent-based, always on; in
  production ``parentbased_traceidratio`` with a ratio);
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``: spans go through the
  SDK's batch span processor (``OTEL_BSP_*``) to the OTLP/HTTP exporter when one is set; without
  one, spans still exist (trace ids reach the logs, the AMQP headers and the job rows) but are
  not sent anywhere;
- ``OTEL_TRACES_EXPORTER=none`` turns export off, ``OTEL_SDK_DISABLED=true`` tracing itself.

One trace per campaign: the HTTP server span (opentelemetry-instrumentation-fastapi), the
statement spans (opentelemetry-instrumentation-sqlalchemy), the publish span (FastStream's
``RabbitTelemetryMiddleware``, W3C ``traceparent`` in the AMQP headers), the worker's process
span and its row-insert span (``worker/processing.py``, ``worker/store.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

logger = logging.getLogger(__name__)

# FastAPI's own OpenTelemetry layer would trace every request a second time: the server spans
# are opentelemetry-instrumentation-fastapi's.
NO_NATIVE_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
# Probes and scrapes are not worth a trace each (regular expressions, searched in the URL).
UNTRACED_URLS = r"/health$,/ready$,/metrics$"


def configure_tracing(service_name: str) -> TracerProvider:
    """The process's tracer provider, made once (later calls return it), and the SQLAlchemy
    instrumentation, which traces the statements of every engine made after this call."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    # The sampler comes from OTEL_TRACES_SAMPLER; the provider flushes its spans at exit.
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporting():
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    SQLAlchemyInstrumentor().instrument(tracer_provider=provider)
    logger.info(
        "tracing configured",
        extra={
            "exporting": exporting(),
            "service_name": provider.resource.attributes.get(SERVICE_NAME),
        },
    )
    return provider


def exporting() -> bool:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


ServerRequestHook = Callable[[trace.Span, dict[str, Any]], None]


def instrument_app(
    app: FastAPI, provider: TracerProvider, *, server_request_hook: ServerRequestHook | None = None
) -> None:
    """A SERVER span for every request but probes and scrapes, without a span for every body
    chunk received or sent; ``server_request_hook`` sees each span as it starts."""
    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=provider,
        excluded_urls=UNTRACED_URLS,
        exclude_spans=["receive", "send"],
        server_request_hook=server_request_hook,
    )


def broker_telemetry(provider: TracerProvider) -> RabbitTelemetryMiddleware:
    """FastStream's middleware: a span for every publish, its W3C context in the AMQP headers."""
    return RabbitTelemetryMiddleware(tracer_provider=provider)


def current_trace_context() -> dict[str, str]:
    """The active span's W3C context (``traceparent``, ``tracestate``), to carry elsewhere."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_trace_id() -> str | None:
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
