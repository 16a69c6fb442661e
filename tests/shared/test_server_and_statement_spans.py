"""The platform's own HTTP server spans (ASGI middleware) and statement spans (engine events, on
the real PostgreSQL): one span each, in the caller's trace, with what a reader of the trace
needs and nothing a request or a query should not leak."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.db import ping
from shared.metrics import metrics_router
from shared.telemetry import NO_NATIVE_TELEMETRY, instrument_app, trace_statements
from tests.support.spans import Spans

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


def _app(spans: Spans) -> FastAPI:
    app = FastAPI(telemetry=NO_NATIVE_TELEMETRY)
    tracer = spans.provider.get_tracer("test.endpoint")

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        tracer.start_span("work inside").end()  # the current span is the server span
        return {"id": item_id}

    @app.get("/away")
    async def away() -> None:
        raise HTTPException(503, "not now")

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    instrument_app(app, spans.provider)
    return app


@pytest.fixture
async def client(spans: Spans) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(spans), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://service:8001") as client:
        yield client


class TestServerSpans:
    async def test_one_span_a_request_named_by_its_route_template(
        self, client: httpx.AsyncClient, spans: Spans
    ) -> None:
        response = await client.get("/items/7", headers={"user-agent": "curl/8"})

        assert response.status_code == 200
        [server] = spans.of_kind(SpanKind.SERVER)
        assert server.name == "GET /items/{item_id}"
        assert server.attributes is not None
        assert dict(server.attributes) == {
            "http.request.method": "GET",
            "url.path": "/items/7",
            "url.scheme": "http",
            "network.protocol.version": "1.1",
            "server.address": "service",
            "server.port": 8001,
            "client.address": "127.0.0.1",
            "user_agent.original": "curl/8",
            "http.route": "/items/{item_id}",
            "http.response.status_code": 200,
        }
        assert server.status.status_code == StatusCode.UNSET

    async def test_the_span_continues_the_callers_trace_and_parents_the_work_inside(
        self, client: httpx.AsyncClient, spans: Spans
    ) -> None:
        await client.get("/items/7", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})

        [server] = spans.of_kind(SpanKind.SERVER)
        [inside] = [span for span in spans.finished() if span.name == "work inside"]
        assert format(server.context.trace_id, "032x") == CALLER_TRACE
        assert server.parent is not None
        assert format(server.parent.span_id, "016x") == CALLER_SPAN
        assert inside.parent is not None
        assert inside.parent.span_id == server.context.span_id

    async def test_probes_and_scrapes_make_no_span(
        self, client: httpx.AsyncClient, spans: Spans
    ) -> None:
        assert (await client.get("/health")).status_code == 200

        assert spans.finished() == ()

    async def test_a_5xx_answer_is_an_error_and_a_4xx_is_not(
        self, client: httpx.AsyncClient, spans: Spans
    ) -> None:
        assert (await client.get("/away")).status_code == 503
        assert (await client.get("/nowhere")).status_code == 404

        away, nowhere = spans.of_kind(SpanKind.SERVER)
        assert away.status.status_code == StatusCode.ERROR
        assert away.attributes is not None
        assert away.attributes["error.type"] == "503"
        # No route matched: the span keeps the method alone, not the raw path, as its name.
        assert nowhere.name == "GET"
        assert nowhere.attributes is not None
        assert "http.route" not in nowhere.attributes
        assert nowhere.attributes["http.response.status_code"] == 404
        assert nowhere.status.status_code == StatusCode.UNSET

    async def test_an_exception_leaving_the_app_is_recorded(
        self, client: httpx.AsyncClient, spans: Spans
    ) -> None:
        assert (await client.get("/bug")).status_code == 500

        [server] = spans.of_kind(SpanKind.SERVER)
        assert server.status.status_code == StatusCode.ERROR
        assert server.attributes is not None
        assert server.attributes["error.type"] == "RuntimeError"
        [exception] = [event for event in server.events if event.name == "exception"]
        assert exception.attributes is not None
        assert exception.attributes["exception.message"] == "a bug"

    async def test_the_query_string_and_credentials_are_not_recorded(
        self, client: httpx.AsyncClient, spans: Spans
    ) -> None:
        await client.get(
            "/items/7?token=s3cret-query", headers={"authorization": "Bearer s3cret-header"}
        )

        [server] = spans.of_kind(SpanKind.SERVER)
        assert server.attributes is not None
        recorded = " ".join(str(value) for value in server.attributes.values())
        assert "s3cret" not in recorded
        assert server.attributes["url.path"] == "/items/7"

    async def test_an_unknown_method_is_named_as_the_conventions_say(
        self, client: httpx.AsyncClient, spans: Spans
    ) -> None:
        await client.request("BREW", "/items/7")

        [server] = spans.of_kind(SpanKind.SERVER)
        assert server.name == "HTTP /items/{item_id}"  # the route matched, the method did not (405)
        assert server.attributes is not None
        assert server.attributes["http.request.method"] == "_OTHER"


@pytest.fixture
async def traced_engine(database_url: str, spans: Spans) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url, pool_size=1, max_overflow=0)
    trace_statements(engine, spans.provider)
    try:
        yield engine
    finally:
        await engine.dispose()


class TestStatementSpans:
    async def test_a_statement_is_a_client_span_of_the_trace_that_runs_it(
        self, traced_engine: AsyncEngine, spans: Spans
    ) -> None:
        tracer = spans.provider.get_tracer("test")
        with tracer.start_as_current_span("request") as request:
            async with traced_engine.connect() as connection:
                await connection.execute(text("SELECT :secret AS value"), {"secret": "s3cret"})

        [statement] = spans.of_kind(SpanKind.CLIENT)
        assert statement.name == "SELECT"
        assert statement.parent is not None
        assert statement.parent.span_id == request.get_span_context().span_id
        assert statement.attributes is not None
        attributes = dict(statement.attributes)
        assert attributes["db.system.name"] == "postgresql"
        assert attributes["db.operation.name"] == "SELECT"
        assert str(attributes["db.query.text"]).startswith("SELECT $1")
        assert attributes["db.namespace"] == traced_engine.url.database
        assert attributes["server.address"] == traced_engine.url.host
        assert attributes["server.port"] == (traced_engine.url.port or 5432)
        assert "s3cret" not in " ".join(str(value) for value in attributes.values())
        assert statement.status.status_code == StatusCode.UNSET

    async def test_a_statement_on_a_table_is_named_by_its_operation_and_table(
        self, traced_engine: AsyncEngine, spans: Spans
    ) -> None:
        async with traced_engine.connect() as connection:
            await connection.execute(
                text("SELECT count(*) FROM campaigns WHERE tenant_id = :tenant"), {"tenant": "t"}
            )
            await connection.execute(text("DELETE FROM outbox WHERE tenant_id = 'nobody'"))

        select, delete = spans.finished()
        assert (select.name, delete.name) == ("SELECT campaigns", "DELETE outbox")
        assert select.attributes is not None
        assert select.attributes["db.collection.name"] == "campaigns"

    async def test_a_statement_that_writes_in_its_with_is_named_by_each_part(
        self, traced_engine: AsyncEngine, spans: Spans
    ) -> None:
        async with traced_engine.begin() as connection:
            await connection.execute(
                text(
                    "WITH gone AS (DELETE FROM outbox WHERE tenant_id = 'nobody' RETURNING id)\n"
                    "SELECT count(*) FROM campaigns WHERE id IN (SELECT id FROM gone)"
                )
            )
            await connection.execute(
                text("WITH mine AS (SELECT id FROM campaigns) SELECT count(*) FROM mine")
            )
            # Column names in parentheses, and a part the planner must not inline.
            await connection.execute(
                text(
                    "WITH gone (ident) AS MATERIALIZED "
                    "(DELETE FROM outbox WHERE tenant_id = 'nobody' RETURNING id), "
                    "kept (ident, n) AS (SELECT id, 1 FROM campaigns) "
                    "SELECT count(*) FROM gone"
                )
            )
            # Parentheses inside a literal and a quoted name are text, not parts.
            await connection.execute(
                text(
                    "WITH gone AS (DELETE FROM outbox WHERE tenant_id = 'no)bo''(dy' "
                    'RETURNING id AS "i)d") '
                    "SELECT count(*) FROM gone"
                )
            )
        writes, reads, listed, quoted = spans.finished()
        assert writes.name == "DELETE outbox SELECT campaigns"
        assert writes.attributes is not None
        assert writes.attributes["db.query.summary"] == writes.name
        assert writes.attributes["db.operation.name"] == "SELECT"
        assert writes.attributes["db.collection.name"] == "campaigns"
        # A WITH that only reads is named by its main statement, as any SELECT.
        assert reads.name == "SELECT mine"
        assert reads.attributes is not None
        assert "db.query.summary" not in reads.attributes
        assert listed.name == "DELETE outbox SELECT campaigns SELECT gone"
        assert quoted.name == "DELETE outbox SELECT gone"

    async def test_transaction_control_makes_no_span(
        self, traced_engine: AsyncEngine, spans: Spans
    ) -> None:
        async with traced_engine.begin() as connection:
            await connection.execute(text("SELECT 1"))
            await connection.execute(text("SELECT 2"))

        assert [span.name for span in spans.finished()] == ["SELECT", "SELECT"]

    async def test_suppressed_statements_make_no_span(
        self, traced_engine: AsyncEngine, spans: Spans
    ) -> None:
        async with traced_engine.connect() as connection:
            with suppress_instrumentation():
                await connection.execute(text("SELECT 1"))
            await connection.execute(text("SELECT 2"))

        [statement] = spans.finished()
        assert statement.attributes is not None
        assert statement.attributes["db.query.text"] == "SELECT 2"

    async def test_readiness_pings_and_scrapes_make_no_span(
        self, traced_engine: AsyncEngine, spans: Spans
    ) -> None:
        async def gauge_from_the_database() -> None:
            async with traced_engine.connect() as connection:
                await connection.execute(text("SELECT count(*) FROM outbox"))

        app = FastAPI(telemetry=NO_NATIVE_TELEMETRY)
        app.include_router(metrics_router(CollectorRegistry(), [gauge_from_the_database]))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            assert (await client.get("/metrics")).status_code == 200
        await ping(traced_engine)

        assert spans.finished() == ()

    async def test_a_failed_statement_is_an_error_span_with_the_servers_code(
        self, traced_engine: AsyncEngine, spans: Spans
    ) -> None:
        async with traced_engine.connect() as connection:
            with pytest.raises(ProgrammingError):
                await connection.execute(text("SELECT * FROM no_such_table"))

        [statement] = spans.finished()
        assert statement.status.status_code == StatusCode.ERROR
        assert statement.attributes is not None
        assert statement.attributes["error.type"] == "42P01"  # undefined_table
        assert statement.attributes["db.response.status_code"] == "42P01"
        assert statement.end_time is not None
