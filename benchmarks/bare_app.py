"""The limit POST/GET /campaigns are measured against: a bare FastAPI app doing the same inserts
(campaign row + outbox row in one statement, in a transaction, as campaign_service writes them)
and the same page query, with asyncpg directly: no token, no tracing, no metrics, no ORM.

With ``BARE_TRACING=true`` it carries the services' stock instrumentation: the tracer provider
of ``shared.telemetry.configure_tracing`` (the SDK's batch span processor and OTLP exporter),
``FastAPIInstrumentor`` as ``shared.telemetry.instrument_app`` installs it, and a span for each
statement, made with the public API (``start_as_current_span``) and named and described as the
SQLAlchemy instrumentation describes the services' statements (opentelemetry-instrumentation-
asyncpg is not a dependency): the floor that tracing alone leaves the services.

    [BARE_TRACING=true] uvicorn benchmarks.bare_app:app --port 8101
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.trace import SpanKind
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from shared.telemetry import NO_NATIVE_TELEMETRY, configure_tracing, instrument_app

TENANT = "bench"
TRACED = os.environ.get("BARE_TRACING") == "true"
INSERT = (
    "WITH campaign AS (INSERT INTO campaigns (id, tenant_id, name, description, created_at) "
    "VALUES ($1, $2, $3, $4, $5)) "
    "INSERT INTO outbox (id, tenant_id, exchange, routing_key, payload, headers) "
    "VALUES ($6, $2, 'bare', 'bare', $7, '{}')"
)
PAGE = (
    "SELECT id, tenant_id, name, description, created_at FROM campaigns "
    "WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC LIMIT 20"
)


class CampaignIn(BaseModel):
    name: str
    description: str | None = None


def campaign_event(
    event_id: uuid.UUID, campaign_id: uuid.UUID, tenant: str, data: CampaignIn, now: datetime
) -> dict[str, Any]:
    """The campaign.created event, as campaign_service writes it into the outbox row."""
    return {
        "event_id": str(event_id),
        "event_type": "campaign.created",
        "schema_version": 1,
        "occurred_at": now.isoformat(),
        "tenant_id": tenant,
        "campaign_id": str(campaign_id),
        "name": data.name,
        "description": data.description,
    }


def campaign_body(
    campaign_id: uuid.UUID, tenant: str, data: CampaignIn, now: datetime
) -> dict[str, Any]:
    """The 201's body."""
    return {
        "id": str(campaign_id),
        "tenant_id": tenant,
        "name": data.name,
        "description": data.description,
        "created_at": now.isoformat(),
    }


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"].replace("+asyncpg", ""), min_size=5, max_size=15
    )
    yield
    await app.state.pool.close()


def database_attributes(url: str) -> dict[str, str | int]:
    """What the SQLAlchemy instrumentation records of a statement's connection, from its URL."""
    parsed = make_url(url)
    attributes: dict[str, str | int] = {SpanAttributes.DB_SYSTEM: "postgresql"}
    if parsed.host:
        attributes[SpanAttributes.NET_PEER_NAME] = parsed.host
    if parsed.port:
        attributes[SpanAttributes.NET_PEER_PORT] = parsed.port
    if parsed.database:
        attributes[SpanAttributes.DB_NAME] = parsed.database
    if parsed.username:
        attributes[SpanAttributes.DB_USER] = parsed.username
    return attributes


def statement_span(
    tracer: trace.Tracer, text: str, database: Mapping[str, str | int]
) -> AbstractContextManager[trace.Span]:
    """A statement's CLIENT span, as the SQLAlchemy instrumentation makes one for the services'
    engines: named by the statement's first word and the database, with the statement's text."""
    name = " ".join(filter(None, (text.split()[0], str(database.get(SpanAttributes.DB_NAME, "")))))
    return tracer.start_as_current_span(
        name,
        kind=SpanKind.CLIENT,
        attributes={**database, SpanAttributes.DB_STATEMENT: text},
    )


# As the services: FastAPI's own tracing off (once a tracer provider exists it would trace every
# request a second time), the platform's instrumentation on when asked for.
app = FastAPI(lifespan=lifespan, telemetry=NO_NATIVE_TELEMETRY)
_tracer: trace.Tracer | None = None
if TRACED:
    _provider = configure_tracing("bare")
    instrument_app(app, _provider)
    _tracer = _provider.get_tracer(__name__)
_database = database_attributes(os.environ.get("DATABASE_URL", "postgresql://"))


def statement(text: str) -> AbstractContextManager[object]:
    """A statement's span when traced, nothing otherwise."""
    return nullcontext() if _tracer is None else statement_span(_tracer, text, _database)


@app.post("/campaigns", status_code=201)
async def create(data: CampaignIn, request: Request) -> dict[str, Any]:
    campaign_id, event_id = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    event = campaign_event(event_id, campaign_id, TENANT, data, now)
    async with request.app.state.pool.acquire() as connection, connection.transaction():
        with statement(INSERT):
            await connection.execute(
                INSERT,
                campaign_id,
                TENANT,
                data.name,
                data.description,
                now,
                event_id,
                json.dumps(event),
            )
    return campaign_body(campaign_id, TENANT, data, now)


@app.get("/campaigns")
async def page(request: Request) -> dict[str, Any]:
    with statement(PAGE):
        rows = await request.app.state.pool.fetch(PAGE, TENANT)
    return {"items": [dict(row) for row in rows], "next_cursor": None}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
