"""The limit POST/GET /campaigns are measured against: a bare FastAPI app doing the same inserts
(campaign row + outbox row in one statement, in a transaction, as campaign_service writes them)
and the same page query, with asyncpg directly: no token, no tracing, no metrics, no ORM.

With ``BARE_TRACING=true`` it is traced as the services are (the same server span middleware and
statement spans, sampled and exported): the floor that tracing alone leaves the services.

    [BARE_TRACING=true] uvicorn benchmarks.bare_app:app --port 8101
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from shared import spans
from shared.telemetry import (
    NO_NATIVE_TELEMETRY,
    configure_tracing,
    database_attributes,
    instrument_app,
    start_statement_span,
)

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


# As the services: FastAPI's own tracing off (once a tracer provider exists it would trace every
# request a second time), the platform's instrumentation on when asked for.
app = FastAPI(lifespan=lifespan, telemetry=NO_NATIVE_TELEMETRY)
if TRACED:
    instrument_app(app, configure_tracing("bare"))
_tracer = spans.tracer(__name__)
_database = database_attributes(make_url(os.environ.get("DATABASE_URL", "postgresql://")))


@contextmanager
def statement(text: str) -> Iterator[None]:
    """A statement's span, as the services' engines make one, when traced."""
    if not TRACED:
        yield
        return
    span = start_statement_span(_tracer, text, _database)
    try:
        yield
    finally:
        span.end()


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
