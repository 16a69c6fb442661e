"""CPU per campaign written, by database layer, in this process: what campaign_service's unit of
work costs on its own, and what each layer under it costs.

Each way writes the same rows (a campaign and its outbox row, in one statement, in a
transaction unless said), one campaign after another on a connection of the service's own engine
(``shared.db.create_engine``: its statement hooks run; their spans are no-ops, as no tracer
provider is configured in this process):

- the service's use case (``service.create_campaign``) in a session, committed, as a request
  runs it: the ORM session, the ``Campaign`` object, the event (its log line switched
  off);
- the same statement, built once as the repositories build it, run by the session;
- the same statement on the session's connection (SQLAlchemy Core, no ORM session in the way);
- its SQL through ``exec_driver_sql`` (SQLAlchemy's connection and its asyncpg adapter, no
  compilation);
- the SQL on asyncpg directly, on a connection of the same pool: BEGIN, INSERT, COMMIT;
- the SQL on asyncpg directly, without the transaction (one statement is atomic on its own).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from benchmarks.harness import Bench
from campaign_service.campaigns import service
from campaign_service.campaigns.repository import CampaignRepository
from campaign_service.campaigns.schemas import CampaignCreate
from campaign_service.outbox.repository import outbox_write
from shared.db import create_engine, create_sessionmaker
from shared.events import CampaignCreated
from shared.settings import DatabaseSettings
from shared.tokens import Principal

TENANT = "bench-uow"
SQL = (
    "WITH campaign AS (INSERT INTO campaigns (id, tenant_id, name, description, created_at) "
    "VALUES ($1, $2, $3, $4, $5)) "
    "INSERT INTO outbox (id, tenant_id, exchange, routing_key, payload, headers) "
    "VALUES ($6, $2, 'campaigns', 'campaign.created', $7, '{}')"
)
WARM_UP = 300


def _event() -> tuple[CampaignCreated, dict[str, Any]]:
    campaign_id = uuid.uuid4()
    event = CampaignCreated(
        tenant_id=TENANT,
        campaign_id=campaign_id,
        name="bench",
        description=None,
        occurred_at=datetime.now(UTC),
    )
    return event, event.model_dump(mode="json")


def _driver_parameters() -> tuple[Any, ...]:
    event, payload = _event()
    return (
        event.campaign_id,
        TENANT,
        event.name,
        event.description,
        event.occurred_at,
        event.event_id,
        json.dumps(payload),
    )


async def _cpu_per_call(call: Callable[[], Awaitable[None]], count: int) -> dict[str, float]:
    for _ in range(WARM_UP):
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await call()
    return {
        "cpu_us": round((time.process_time() - cpu) / count * 1e6, 1),
        "wall_us": round((time.perf_counter() - wall) / count * 1e6, 1),
    }


async def run(bench: Bench, count: int = 3000) -> dict[str, Any]:
    engine = create_engine(DatabaseSettings(database_url=bench.database_url), application_name="b")
    sessionmaker = create_sessionmaker(engine)
    principal = Principal(
        user_id=uuid.uuid4(),
        tenant_id=TENANT,
        role="owner",
        token_id="bench",
        expires_at=datetime.now(UTC),
    )
    data = CampaignCreate(name="bench")
    # The use case logs a line per campaign: off here, so the figures are the database layers'.
    logging.getLogger(service.__name__).disabled = True

    async def use_case() -> None:
        async with sessionmaker() as session:
            await service.create_campaign(session=session, principal=principal, data=data)
            await session.commit()

    # Its new() and insert() make a row and its statement; neither touches a session.
    campaigns = CampaignRepository(None, tenant_id=TENANT)  # type: ignore[arg-type]

    def statement() -> tuple[Any, dict[str, Any]]:
        """The repositories' statement and its parameters, as OutboxRepository.add runs them
        (no hand-over to a relay here)."""
        event, _ = _event()
        write = campaigns.insert(campaigns.new(name=event.name, description=None))
        _, insert, values = outbox_write(event, headers={}, together_with=write)
        return insert, values

    async def session_statement() -> None:
        async with sessionmaker() as session:
            await session.execute(*statement())
            await session.commit()

    async def core_statement() -> None:
        async with engine.begin() as connection:
            await connection.execute(*statement())

    async def driver_sql() -> None:
        async with engine.begin() as connection:
            await connection.exec_driver_sql(SQL, _driver_parameters())

    async def driver(connection: AsyncConnection) -> Any:
        raw = await connection.get_raw_connection()
        return raw.driver_connection

    async def asyncpg_transaction() -> None:
        async with engine.connect() as connection:
            asyncpg = await driver(connection)
            async with asyncpg.transaction():
                await asyncpg.execute(SQL, *_driver_parameters())

    async def asyncpg_statement() -> None:
        async with engine.connect() as connection:
            asyncpg = await driver(connection)
            await asyncpg.execute(SQL, *_driver_parameters())

    ways = [
        ("the use case in a session (as a request runs it)", use_case),
        ("its statement, run by the session", session_statement),
        ("its statement on a connection (Core)", core_statement),
        ("its SQL through exec_driver_sql", driver_sql),
        ("its SQL on asyncpg: BEGIN, INSERT, COMMIT", asyncpg_transaction),
        ("its SQL on asyncpg, no transaction", asyncpg_statement),
    ]
    results: dict[str, Any] = {}
    try:
        for name, call in ways:
            results[name] = await _cpu_per_call(call, count)
        async with engine.begin() as connection:  # nothing left for the HTTP runs' relay
            await connection.exec_driver_sql("DELETE FROM outbox WHERE tenant_id = $1", (TENANT,))
            await connection.exec_driver_sql(
                "DELETE FROM campaigns WHERE tenant_id = $1", (TENANT,)
            )
    finally:
        logging.getLogger(service.__name__).disabled = False
        await engine.dispose()
    first = results[ways[0][0]]["cpu_us"]
    results["table"] = [
        {
            "way": name,
            "CPU µs": results[name]["cpu_us"],
            "wall µs": results[name]["wall_us"],
            "CPU vs the use case": round(results[name]["cpu_us"] / first, 2),
        }
        for name, _ in ways
    ]
    return results
