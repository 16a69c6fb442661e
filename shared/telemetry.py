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

Spans are encoded and sent by a process of the service's own (``shared/span_export.py``), so
that the encoding does not hold the GIL the service's event loop needs.

One trace per campaign: the HTTP server span (:class:`ServerSpans`, ASGI middleware), the
statement spans (:func:`trace_statements`, SQLAlchemy engine events), the publish span
(:class:`RabbitTracing`, broker middleware, W3C ``traceparent`` in the AMQP headers), the
worker's process span (``worker/processing.py``, from those headers), and the job row's insert.

Every one of these spans comes from a tracer of ``shared/spans.py``: the SDK's sampler, ids and
export pipeline, without the SDK's span class and its per-attribute checks and locks.

The HTTP and statement spans are the platform's own, not opentelemetry-instrumentation-fastapi
and -asyncpg: those cost a request more CPU than the spans they make (route matching, attribute
hydration and a span started for every driver call, BEGIN and COMMIT included), which the
benchmark suite measured at about a sixth of a ``POST /campaigns``. These make the same spans
with the stable semantic conventions' attributes, and nothing else.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from faststream import BaseMiddleware, ContextRepo
from faststream.rabbit.response import RabbitPublishCommand
from opentelemetry import context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from sqlalchemy import event
from sqlalchemy.engine import URL, ExceptionContext, ExecutionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import spans
from shared.metrics import KNOWN_METHODS
from shared.span_export import ExportProcessSpanProcessor

logger = logging.getLogger(__name__)

_provider: TracerProvider | None = None

# FastAPI's own OpenTelemetry layer (on by default once a tracer provider exists) would trace
# every request a second time: the platform's server spans are :class:`ServerSpans`.
NO_NATIVE_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
# Probes and scrapes are not worth a trace each.
UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})


def configure_tracing(service_name: str) -> TracerProvider:
    """The process's tracer provider (created once; later calls return it)."""
    global _provider
    if _provider is not None:
        return _provider
    attributes: dict[str, Any] = {}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(
        resource=Resource.create(attributes), sampler=sampling._get_from_env_or_default()
    )
    if _exporting():
        provider.add_span_processor(ExportProcessSpanProcessor(service_name))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # flush the last spans when the process ends
    _provider = provider
    logger.info(
        "tracing configured",
        extra={
            "exporting": _exporting(),
            "service_name": provider.resource.attributes.get(SERVICE_NAME),
        },
    )
    return provider


def _exporting() -> bool:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def instrument_app(app: FastAPI, provider: TracerProvider) -> None:
    """A SERVER span for every request but probes and scrapes, outside every other middleware
    (so that their log lines carry its trace)."""
    app.add_middleware(ServerSpans, tracer=spans.tracer(__name__, provider))


class ServerSpans:
    """ASGI middleware: one SERVER span a request, the child of the caller's W3C context,
    named ``<method> <route template>`` once the router has chosen the route.

    Attributes as the stable HTTP semantic conventions name them; no query string and no header
    but the user agent is recorded (they may carry secrets). A 5xx answer, or an exception
    leaving the app, marks the span as an error.
    """

    def __init__(
        self, app: ASGIApp, *, tracer: trace.Tracer, untraced: frozenset[str] = UNTRACED_PATHS
    ) -> None:
        self.app = app
        self._tracer = tracer
        self._untraced = untraced

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._untraced:
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        parent = propagate.extract(headers)
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "_OTHER"
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if server := scope.get("server"):
            attributes["server.address"] = server[0]
            if server[1] is not None:  # None on a Unix socket
                attributes["server.port"] = server[1]
        if client := scope.get("client"):
            attributes["client.address"] = client[0]
        if user_agent := headers.get("user-agent"):
            attributes["user_agent.original"] = user_agent
        name = "HTTP" if method == "_OTHER" else method
        span = self._tracer.start_span(
            name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
        )
        status: int | None = None

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = context.attach(trace.set_span_in_context(span, parent))
        error: str | None = None
        try:
            await self.app(scope, receive, observed_send)
        except BaseException as exc:
            error = type(exc).__qualname__
            span.record_exception(exc)
            raise
        finally:
            context.detach(token)
            if route := getattr(scope.get("route"), "path", None):
                span.update_name(f"{name} {route}")
                span.set_attribute("http.route", route)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if error is None and (status is None or status >= 500):
                error = str(status or "incomplete_response")
            if error is not None:
                span.set_attribute("error.type", error)
                span.set_status(trace.StatusCode.ERROR)
            span.end()


def trace_statements(
    engine: AsyncEngine, tracer_provider: trace.TracerProvider | None = None
) -> None:
    """A CLIENT span for every statement the engine runs (but under ``suppress_instrumentation``),
    in the trace of whoever runs it (:func:`start_statement_span`). Transaction control (BEGIN,
    COMMIT) and pool pings are not statements run through a cursor, so they make no span.

    The tracer comes from the process's provider (:func:`configure_tracing`) unless one is given,
    even when that is set after the engine is made."""
    tracer = spans.tracer(__name__, tracer_provider)
    database = database_attributes(engine.url)

    def start(statement: str, context: ExecutionContext, **_: Any) -> None:
        if is_instrumentation_enabled():
            context._trace_span = start_statement_span(tracer, statement, database)  # type: ignore[attr-defined]

    def end(context: ExecutionContext, **_: Any) -> None:
        span: trace.Span | None = context.__dict__.pop("_trace_span", None)
        if span is not None:
            span.end()

    def failed(exception: ExceptionContext) -> None:
        execution = exception.execution_context
        span: trace.Span | None = execution.__dict__.pop("_trace_span", None) if execution else None
        if span is not None:
            # The server's SQLSTATE (42P01: no such table) when it answered, else the error's name.
            code = getattr(exception.original_exception, "sqlstate", None)
            if code:
                span.set_attribute("db.response.status_code", code)
            span.set_attribute("error.type", code or type(exception.original_exception).__name__)
            span.set_status(trace.StatusCode.ERROR)
            span.end()

    event.listen(engine.sync_engine, "before_cursor_execute", start, named=True)
    event.listen(engine.sync_engine, "after_cursor_execute", end, named=True)
    event.listen(engine.sync_engine, "handle_error", failed)


def database_attributes(url: URL) -> dict[str, AttributeValue]:
    """The attributes every statement span on the database at ``url`` carries."""
    attributes: dict[str, AttributeValue] = {"db.system.name": "postgresql"}
    if url.database:
        attributes["db.namespace"] = url.database
    if url.host:
        attributes["server.address"] = url.host
        attributes["server.port"] = url.port or 5432
    return attributes


def start_statement_span(
    tracer: trace.Tracer, statement: str, database: dict[str, AttributeValue]
) -> trace.Span:
    """A statement's CLIENT span, named ``<operation> <table>`` (``INSERT campaigns``) as the
    database conventions name it, with its text and never its parameters. A statement with
    data-modifying ``WITH`` parts is named by each part in turn, as a query summary (``INSERT
    campaigns INSERT outbox``); its operation and table are the main statement's."""
    operation, table, summary = _names(statement)
    attributes = {**database, "db.operation.name": operation, "db.query.text": statement}
    if table:
        attributes["db.collection.name"] = table
    if summary:
        attributes["db.query.summary"] = summary
    return tracer.start_span(
        summary or (f"{operation} {table}" if table else operation),
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
    )


# The table a plain INSERT, UPDATE, DELETE or SELECT works on (a SELECT's first FROM).
_TARGET = re.compile(
    r"\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|SELECT\b.*?\bFROM)\s+\"?([A-Za-z_][\w.]*)",
    re.IGNORECASE | re.DOTALL,
)


def _operation_and_table(statement: str) -> tuple[str, str | None]:
    words = statement.split(None, 1)
    if not words:
        return "postgresql", None
    target = _TARGET.match(statement)
    return words[0].upper(), target.group(1) if target else None


def _with_parts(statement: str) -> list[str] | None:
    """The bodies of a ``WITH`` statement's parts and, last, its main statement; None when the
    statement has no ``WITH`` (or one this cannot follow). Parentheses inside quotes (a string
    literal, a quoted name) are text, not structure; dollar quotes are not followed."""
    if statement.lstrip()[:5].upper() not in ("WITH ", "WITH\n"):
        return None
    parts, depth, start = [], 0, 0
    body = False  # the parenthesis open at depth 1 holds a part (not a list of column names)
    quote = ""  # the quote character of the literal or name being read, if any
    for index, char in enumerate(statement):
        if quote:
            # A doubled quote (an escaped one) ends the literal and starts it again at once.
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
            if depth == 1:
                start = index + 1
                before = statement[:index].rstrip().upper()
                body = before.endswith((" AS", " MATERIALIZED"))
        elif char == ")":
            depth -= 1
            if depth == 0 and body:
                parts.append(statement[start:index])
                rest = statement[index + 1 :].lstrip()
                if not rest.startswith(","):
                    return [*parts, rest]
    return None


@functools.lru_cache(maxsize=1024)  # the engine's statements are a few texts run again and again
def _names(statement: str) -> tuple[str, str | None, str | None]:
    """The statement's operation and table, and a summary of its parts when it has a ``WITH``
    that writes."""
    parts = _with_parts(statement)
    if parts is None:
        return (*_operation_and_table(statement), None)
    named = [_operation_and_table(part) for part in parts]
    operation, table = named[-1]
    if all(part_operation == "SELECT" for part_operation, _ in named[:-1]):
        return operation, table, None  # a read-only WITH: named by its main statement
    summary = " ".join(f"{op} {name}" if name else op for op, name in named)
    return operation, table, summary


class RabbitTracing:
    """Broker middleware: a PRODUCER span for every publish (``<exchange>.<routing key>
    publish``, as FastStream names its own), with its W3C context in the message's AMQP headers,
    so the consumer's span is its child.

    One span a publish: FastStream's own telemetry middleware records a second ("create") for
    every message, which the trace does not need. Nothing on the platform consumes through a
    FastStream subscriber (the worker makes its own process spans), so there is no consume side.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = spans.tracer(__name__, provider)

    def __call__(self, msg: Any | None, /, *, context: ContextRepo) -> _PublishSpan:
        return _PublishSpan(msg, context=context, tracer=self._tracer)


class _PublishSpan(BaseMiddleware[RabbitPublishCommand, Any]):
    def __init__(self, msg: Any | None, /, *, context: ContextRepo, tracer: trace.Tracer) -> None:
        super().__init__(msg, context=context)
        self._tracer = tracer

    async def publish_scope(
        self, call_next: Callable[[RabbitPublishCommand], Awaitable[Any]], cmd: RabbitPublishCommand
    ) -> Any:
        with publish_span(
            self._tracer,
            exchange=cmd.exchange.name,
            routing_key=cmd.destination,
            message_id=cmd.message_options.get("message_id"),
            correlation_id=cmd.correlation_id,
            headers=cmd.headers,
        ):
            return await call_next(cmd)


@contextlib.contextmanager
def publish_span(
    tracer: trace.Tracer,
    *,
    exchange: str,
    routing_key: str,
    message_id: str | None,
    correlation_id: str | None,
    headers: dict[str, Any],
) -> Iterator[trace.Span]:
    """A publish's PRODUCER span (``<exchange>.<routing key> publish``, as FastStream names its
    own), current while the block runs, with its W3C context written into ``headers``."""
    attributes: dict[str, AttributeValue] = {
        SpanAttributes.MESSAGING_SYSTEM: "rabbitmq",
        SpanAttributes.MESSAGING_OPERATION: "publish",
        SpanAttributes.MESSAGING_DESTINATION_NAME: exchange,
        SpanAttributes.MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY: routing_key,
    }
    if message_id:
        attributes[SpanAttributes.MESSAGING_MESSAGE_ID] = message_id
    if correlation_id:
        attributes[SpanAttributes.MESSAGING_MESSAGE_CONVERSATION_ID] = correlation_id
    with tracer.start_as_current_span(
        f"{exchange or 'default'}.{routing_key} publish",
        kind=trace.SpanKind.PRODUCER,
        attributes=attributes,
    ) as span:
        propagate.inject(headers)
        try:
            yield span
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


# A W3C traceparent of version 00, as the platform's publishers write it.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_W3C_PROPAGATORS = [TraceContextTextMapPropagator, W3CBaggagePropagator]


@functools.cache
def _w3c_only(textmap: TextMapPropagator) -> bool:
    """Whether the propagator is the default one (``OTEL_PROPAGATORS=tracecontext,baggage``)."""
    inner = getattr(textmap, "_propagators", None)
    return isinstance(textmap, CompositePropagator) and [type(p) for p in inner or ()] in (
        _W3C_PROPAGATORS,
        _W3C_PROPAGATORS[:1],
    )


def _w3c_only_textmap() -> bool:
    try:
        return _w3c_only(propagate.get_global_textmap())
    except TypeError:  # a propagator of a deployment's own that cannot be hashed
        return False


def context_from(carrier: dict[str, Any]) -> Context:
    """The trace context in a message's headers, as ``propagate.extract`` reads it. A plain
    ``traceparent`` (no ``tracestate``, no baggage) under the default propagators is read here
    directly: the worker reads one for every delivery, and the propagators' getters, regular
    expression and composite cost twice as much. Anything else goes to ``propagate.extract``."""
    value = carrier.get("traceparent")
    if (
        type(value) is str
        and "tracestate" not in carrier
        and "baggage" not in carrier
        and _w3c_only_textmap()
        and (match := _TRACEPARENT.fullmatch(value))
    ):
        trace_id, span_id = int(match[1], 16), int(match[2], 16)
        if trace_id and span_id:
            parent = SpanContext(trace_id, span_id, True, TraceFlags(int(match[3], 16)))
            return trace.set_span_in_context(trace.NonRecordingSpan(parent), Context())
    return propagate.extract(carrier)


def current_trace_id() -> str | None:
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
