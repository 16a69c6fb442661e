"""A second limit for POST /campaigns: the work campaign_service does for one, on bare libraries.

The bare app (``bare_app.py``, the limit the target names) only inserts. This one does what a
campaign costs the service, without its framework layers (dependencies, ORM session, the
platform's middlewares): the Bearer token verified with joserfc against the issuer's JWKS (each
token remembered until its ``exp``, at most 60 s, as the service does), the body validated, the
campaign and its outbox row inserted by one statement on asyncpg in a transaction, the event
published after the commit from memory (aio-pika, persistent, ``mandatory``, confirmed, over 16
channels) and the rows of published events deleted together every 0.2 s, a JSON log line and a
counter and a latency histogram per request, uvicorn's access line.

Traced with the services' stock instrumentation, through the public OpenTelemetry API: the
tracer provider of ``shared.telemetry.configure_tracing`` (the SDK's batch span processor and
OTLP exporter, the ``OTEL_*`` variables), ``FastAPIInstrumentor`` as
``shared.telemetry.instrument_app`` installs it (the server span), the INSERT's span as
``bare_app.statement_span`` makes it (``start_as_current_span``, named and described as the
SQLAlchemy instrumentation describes the service's statements), and a PRODUCER span for each
publish, named and described as FastStream's telemetry middleware names its own, whose W3C
context goes in the message's headers (as the request's goes in the outbox row). With
``OTEL_SDK_DISABLED=true`` every span is a no-op: compare it with campaign_service run the same
way.

    JWT_JWKS_URL=... uvicorn benchmarks.same_work_app:app --port 8102
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
from fastapi import FastAPI, HTTPException, Request
from joserfc import jwt
from joserfc.jwk import KeySet
from opentelemetry import propagate
from opentelemetry.semconv.trace import SpanAttributes
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Histogram

from benchmarks.bare_app import (
    CampaignIn,
    campaign_body,
    campaign_event,
    database_attributes,
    statement_span,
)
from shared.messaging import CAMPAIGNS_EXCHANGE
from shared.telemetry import (
    NO_NATIVE_TELEMETRY,
    configure_tracing,
    current_trace_context,
    instrument_app,
)

INSERT = (
    "WITH campaign AS (INSERT INTO campaigns (id, tenant_id, name, description, created_at) "
    "VALUES ($1, $2, $3, $4, $5)) "
    "INSERT INTO outbox (id, tenant_id, exchange, routing_key, payload, headers) "
    "VALUES ($6, $2, $7, 'campaign.created', $8, $9)"
)
CHANNELS = 16

logger = logging.getLogger("same_work")
_registry = CollectorRegistry()
_created = Counter("campaigns_created", "", registry=_registry)
_duration = Histogram("request_duration_seconds", "", registry=_registry)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "timestamp": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                **getattr(record, "fields", {}),
            }
        )


class State:
    def __init__(self) -> None:
        self.keys = KeySet([])
        self.claims = jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": os.environ.get("JWT_ISSUER", "campaign-platform")},
            aud={"essential": True, "value": os.environ.get("JWT_AUDIENCE", "campaign-platform")},
            exp={"essential": True},
            tenant_id={"essential": True},
        )
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (tenant, monotonic deadline)
        self.published: list[uuid.UUID] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def tenant_of(self, authorization: str | None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401)
        token = authorization[7:]
        remembered = self.tokens.get(token)
        if remembered is not None and remembered[1] > time.monotonic():
            return remembered[0]
        try:
            claims = jwt.decode(token, self.keys, algorithms=["Ed25519"]).claims
            self.claims.validate(claims)
        except Exception as exc:  # any failure is the token's
            raise HTTPException(401) from exc
        lifetime = min(claims["exp"] - time.time(), 60)
        self.tokens[token] = (claims["tenant_id"], time.monotonic() + lifetime)
        return str(claims["tenant_id"])


state = State()


async def _delete_published(pool: asyncpg.Pool) -> None:
    while True:
        await asyncio.sleep(0.2)
        if state.published:
            ids, state.published = state.published, []
            await pool.execute("DELETE FROM outbox WHERE id = ANY($1::uuid[])", ids)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLines())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    async with httpx.AsyncClient() as client:
        response = await client.get(os.environ["JWT_JWKS_URL"])
    state.keys = KeySet.import_key_set(response.json())
    pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"].replace("+asyncpg", ""), min_size=5, max_size=20
    )
    connection = await aio_pika.connect_robust(os.environ["RABBITMQ_URL"])
    channels = [await connection.channel(publisher_confirms=True) for _ in range(CHANNELS)]
    exchanges = [
        await channel.declare_exchange(
            CAMPAIGNS_EXCHANGE.name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for channel in channels
    ]
    app.state.pool, app.state.exchanges = pool, itertools.cycle(exchanges)
    deleter = asyncio.create_task(_delete_published(pool))
    yield
    deleter.cancel()
    with suppress(asyncio.CancelledError):
        await deleter
    await asyncio.gather(*state.tasks, return_exceptions=True)
    await connection.close()
    await pool.close()


# As the service: FastAPI's own tracing off, the stock instrumentation on.
app = FastAPI(lifespan=lifespan, telemetry=NO_NATIVE_TELEMETRY)
_provider = configure_tracing("same_work")
instrument_app(app, _provider)
_tracer = _provider.get_tracer(__name__)
_database = database_attributes(os.environ.get("DATABASE_URL", "postgresql://"))
_PUBLISH_ATTRIBUTES = {
    SpanAttributes.MESSAGING_SYSTEM: "rabbitmq",
    SpanAttributes.MESSAGING_DESTINATION_NAME: CAMPAIGNS_EXCHANGE.name,
    SpanAttributes.MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY: "campaign.created",
    SpanAttributes.MESSAGING_OPERATION: "publish",
}


async def _publish(exchange: aio_pika.abc.AbstractExchange, event: dict[str, Any]) -> None:
    # In the request's trace (the task was started in it), as the relay publishes in the trace
    # of the request that wrote the row; the publish span's context goes with the message.
    with _tracer.start_as_current_span(
        f"{CAMPAIGNS_EXCHANGE.name}.{event['event_type']} publish",
        kind=SpanKind.PRODUCER,
        attributes=_PUBLISH_ATTRIBUTES,
    ):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(event).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event["event_id"],
                type=event["event_type"],
                timestamp=datetime.now(UTC),
                headers=dict(headers),  # aio-pika's header value type
            ),
            routing_key=event["event_type"],
            mandatory=True,
            timeout=5,
        )
    state.published.append(uuid.UUID(event["event_id"]))


@app.post("/campaigns", status_code=201)
async def create(data: CampaignIn, request: Request) -> dict[str, Any]:
    started = time.perf_counter()
    tenant = state.tenant_of(request.headers.get("authorization"))
    campaign_id, event_id = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    event = campaign_event(event_id, campaign_id, tenant, data, now)
    async with request.app.state.pool.acquire() as connection, connection.transaction():
        with statement_span(_tracer, INSERT, _database):
            await connection.execute(
                INSERT,
                campaign_id,
                tenant,
                data.name,
                data.description,
                now,
                event_id,
                CAMPAIGNS_EXCHANGE.name,
                json.dumps(event),
                # The request's trace context, kept with the row as the service keeps it.
                json.dumps(current_trace_context()),
            )
    task = asyncio.create_task(_publish(next(request.app.state.exchanges), event))
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
    logger.info(
        "campaign created",
        extra={"fields": {"tenant_id": tenant, "campaign_id": str(campaign_id)}},
    )
    _created.inc()
    _duration.observe(time.perf_counter() - started)
    return campaign_body(campaign_id, tenant, data, now)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
