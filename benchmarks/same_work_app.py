"""A second limit for POST /campaigns: the work campaign_service does for one, on bare libraries.

The bare app (``bare_app.py``, the limit the target names) only inserts. This one does what a
campaign costs the service, without its framework layers (dependencies, ORM session, the
platform's middlewares): the Bearer token verified with joserfc against the issuer's JWKS (each
token remembered until its ``exp``, at most 60 s, as the service does), the body validated, the
campaign and its outbox row inserted by one statement on asyncpg in a transaction, the event
published after the commit from memory (aio-pika, persistent, ``mandatory``, confirmed, over 16
channels) and the rows of published events deleted together every 0.2 s, a JSON log line and a
counter and a latency histogram per request, uvicorn's access line. No tracing: compare it with
campaign_service run with tracing off.

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
from prometheus_client import CollectorRegistry, Counter, Histogram

from benchmarks.bare_app import CampaignIn, campaign_body, campaign_event
from shared.messaging import CAMPAIGNS_EXCHANGE

INSERT = (
    "WITH campaign AS (INSERT INTO campaigns (id, tenant_id, name, description, created_at) "
    "VALUES ($1, $2, $3, $4, $5)) "
    "INSERT INTO outbox (id, tenant_id, exchange, routing_key, payload, headers) "
    "VALUES ($6, $2, $7, 'campaign.created', $8, '{}')"
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


app = FastAPI(lifespan=lifespan)


async def _publish(exchange: aio_pika.abc.AbstractExchange, event: dict[str, Any]) -> None:
    await exchange.publish(
        aio_pika.Message(
            json.dumps(event).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event["event_id"],
            type=event["event_type"],
            timestamp=datetime.now(UTC),
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
