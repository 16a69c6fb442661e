"""The outbox: a campaign whose POST returned 201 is published, whatever the broker does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, insert, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from campaign_service.app import create_app as create_campaign_app
from campaign_service.outbox import relay as relay_module
from campaign_service.outbox.repository import OutboxRepository
from campaign_service.settings import CampaignServiceSettings
from shared.db import TransactionAborted, Write, create_sessionmaker
from shared.events import CampaignCreated
from shared.models import OutboxMessage
from tests.pipeline.conftest import (
    CAMPAIGN_SERVICE_URL,
    make_campaign_settings,
    make_worker_settings,
    wait_ready,
)
from tests.support.campaigns import create_campaign, login_headers, steps, wait_for_jobs
from tests.support.metrics import value
from tests.support.polling import eventually
from tests.support.rabbit import PrivateRabbitNode, take_all
from worker.app import create_app as create_worker_app

QUEUE = "worker.campaign.created"


async def outbox_rows(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch("SELECT * FROM outbox WHERE tenant_id = $1", tenant)
    return rows


def named_event(tenant: str, name: str) -> CampaignCreated:
    return CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name=name)


def published_names(amqp_url: str) -> Callable[[], Awaitable[list[str]]]:
    """Each call takes what the queue holds now and returns the names of every event taken."""
    names: list[str] = []

    async def published() -> list[str]:
        names.extend(json.loads(m.body)["name"] for m in await take_all(amqp_url, QUEUE))
        return names

    return published


class TestPublishing:
    async def test_the_event_is_published_as_designed(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        campaign = await create_campaign(campaign_client, headers, "published")
        await eventually(lambda: outbox_rows(db, tenant), until=lambda rows: not rows)

        [message] = await take_all(amqp_url, "worker.campaign.created")

        body = json.loads(message.body)
        assert body["campaign_id"] == campaign["id"]
        assert set(body) >= {
            "event_id",
            "event_type",
            "occurred_at",
            "tenant_id",
            "campaign_id",
            "name",
            "description",
        }
        assert message.message_id == body["event_id"]
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        assert message.routing_key == "campaign.created"
        assert message.exchange == "campaigns"

    async def test_campaign_and_outbox_row_commit_together(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        # The database refuses this tenant's outbox rows (and only its: NOT VALID, other rows
        # are not checked), so the event's row fails after the campaign's was written.
        constraint = f"refuse_{uuid.uuid4().hex}"
        await db.execute(
            f"ALTER TABLE outbox ADD CONSTRAINT {constraint} "
            f"CHECK (tenant_id <> '{tenant}') NOT VALID"
        )
        try:
            response = await campaign_client.post(
                "/campaigns", json={"name": "half"}, headers=headers
            )
        finally:
            await db.execute(f"ALTER TABLE outbox DROP CONSTRAINT {constraint}")

        assert response.status_code == 500
        count = await db.fetchval("SELECT count(*) FROM campaigns WHERE tenant_id = $1", tenant)
        assert count == 0

    async def test_a_row_written_with_it_must_not_reuse_the_outbox_rows_parameters(
        self, db_engine: AsyncEngine, db: asyncpg.Connection, tenant: str
    ) -> None:
        event = CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name="clash")
        other = Write(insert(OutboxMessage.__table__), {"id": uuid.uuid4()})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"\['id'\]"):
            async with create_sessionmaker(db_engine)() as session, session.begin():
                await OutboxRepository(session).add(event, together_with=other)

        assert await outbox_rows(db, tenant) == []

    @pytest.mark.parametrize(
        ("where", "refusal"),
        [
            # An event no queue is bound for: with `mandatory` the broker hands it back.
            ({"routing_key": "campaign.nowhere"}, "NO_ROUTE"),
            # An exchange that does not exist: published, it would close the connection.
            ({"exchange": "nowhere"}, "NOT_FOUND"),
        ],
        ids=["unroutable", "no such exchange"],
    )
    async def test_a_refused_message_stays_and_does_not_block_others(
        self,
        campaign_client: httpx.AsyncClient,
        campaign_app: FastAPI,
        headers: dict[str, str],
        db: asyncpg.Connection,
        db_engine: AsyncEngine,
        tenant: str,
        where: dict[str, str],
        refusal: str,
    ) -> None:
        orphan = CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name="orphan")
        async with create_sessionmaker(db_engine)() as session, session.begin():
            await OutboxRepository(session).add(orphan)
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == orphan.event_id)
                # Refused for a very long time already: the backoff must stay bounded.
                .values(**where, attempts=5000)
            )
        connection = await campaign_app.state.broker.connect()
        try:
            campaign_app.state.relay.notify()
            [row] = await eventually(
                lambda: outbox_rows(db, tenant),
                until=lambda rows: bool(rows) and rows[0]["attempts"] > 5000,
                what="the refused row marked",
            )
            assert refusal in row["last_error"]

            campaign = await create_campaign(campaign_client, headers, "still flows")
            await eventually(
                lambda: outbox_rows(db, tenant),
                until=lambda rows: [r["id"] for r in rows] == [orphan.event_id],
                what="the new campaign published past the refused row",
            )
            assert campaign["name"] == "still flows"
            # On the same connection: the refusal did not take the broker connection down.
            assert await campaign_app.state.broker.connect() is connection
        finally:
            await db.execute("DELETE FROM outbox WHERE id = $1", orphan.event_id)

    async def test_replicas_share_the_outbox_and_publish_each_row_once(
        self,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        db_engine: AsyncEngine,
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        events = [
            CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name=f"e{i}")
            for i in range(300)
        ]
        async with create_sessionmaker(db_engine)() as session, session.begin():
            for event in events:
                await OutboxRepository(session).add(event)
        settings = make_campaign_settings(database_url, amqp_url, outbox_batch_size=20)
        replicas = [create_campaign_app(settings, jwks_client=user_client) for _ in range(2)]

        async with (
            replicas[0].router.lifespan_context(replicas[0]),
            replicas[1].router.lifespan_context(replicas[1]),
        ):
            await eventually(
                lambda: outbox_rows(db, tenant), until=lambda rows: not rows, timeout=20
            )
            published = [
                await value(replica, "outbox_published_messages_total") for replica in replicas
            ]

        messages = await take_all(amqp_url, "worker.campaign.created")
        assert sorted(m.message_id or "" for m in messages) == sorted(
            str(e.event_id) for e in events
        )
        assert sum(published) == len(events)
        assert all(count > 0 for count in published), published


class TestFastPath:
    """A campaign's event leaves from the memory of the process that committed it, without
    waiting for a poll; the poll is only for what that could not do."""

    async def test_the_event_leaves_without_waiting_for_a_poll(
        self,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        headers: dict[str, str],
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        settings = make_campaign_settings(database_url, amqp_url, outbox_poll_interval_seconds=3600)
        async with running_campaigns(settings, user_client) as (_, client):
            campaign = await create_campaign(client, headers, "straight out")
            await eventually(lambda: outbox_rows(db, tenant), until=lambda rows: not rows)

        messages = await take_all(amqp_url, "worker.campaign.created")
        assert [json.loads(m.body)["campaign_id"] for m in messages] == [campaign["id"]]

    async def test_rows_of_events_sent_one_by_one_are_deleted_together(
        self,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        headers: dict[str, str],
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        settings = make_campaign_settings(database_url, amqp_url, outbox_poll_interval_seconds=3600)
        async with running_campaigns(settings, user_client) as (app, client):
            deletes = count_statements(app.state.engine, "DELETE FROM outbox")
            campaigns = [await create_campaign(client, headers, f"trickle {n}") for n in range(10)]
            await eventually(lambda: outbox_rows(db, tenant), until=lambda rows: not rows)

        messages = await take_all(amqp_url, QUEUE)
        assert sorted(json.loads(m.body)["campaign_id"] for m in messages) == sorted(
            c["id"] for c in campaigns
        )
        # Each campaign is published by itself, at once; their rows go a few at a time.
        assert 1 <= len(deletes) < len(campaigns) / 2

    async def test_a_stopping_service_deletes_the_rows_it_published(
        self,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        headers: dict[str, str],
        db: asyncpg.Connection,
        tenant: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(relay_module, "_DELETE_LINGER_SECONDS", 3600.0)
        settings = make_campaign_settings(
            database_url,
            amqp_url,
            outbox_poll_interval_seconds=3600,
            outbox_claim_after_seconds=14_400,
        )
        async with running_campaigns(settings, user_client) as (app, client):
            campaign = await create_campaign(client, headers, "published, then stopped")
            await eventually(
                lambda: value(app, "outbox_published_messages_total"), until=lambda n: n == 1
            )
            assert len(await outbox_rows(db, tenant)) == 1  # its delete waits for company

        assert await outbox_rows(db, tenant) == []
        messages = await take_all(amqp_url, QUEUE)
        assert [json.loads(m.body)["campaign_id"] for m in messages] == [campaign["id"]]

    async def test_only_what_a_session_commits_is_published(
        self,
        campaign_app: FastAPI,
        amqp_url: str,
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        """Rolled back whole, or from a savepoint, or a savepoint released in a transaction
        that then rolls back: none of it leaves. A session that commits twice sends each
        transaction's own messages once."""

        def event(name: str) -> CampaignCreated:
            return named_event(tenant, name)

        class Undo(Exception):
            pass

        kept = [event("kept 1"), event("kept 2"), event("kept 3")]
        async with campaign_app.state.sessionmaker() as session:
            outbox = OutboxRepository(session)
            with contextlib.suppress(Undo):
                async with session.begin():
                    async with session.begin_nested():
                        await outbox.add(event("released, then undone with all"))
                    raise Undo
            await outbox.add(event("rolled back"))
            await session.rollback()
            await outbox.add(kept[0])
            await session.commit()
            async with session.begin():
                await outbox.add(kept[1])
                with contextlib.suppress(Undo):
                    async with session.begin_nested():
                        await outbox.add(event("savepoint rolled back"))
                        raise Undo
                async with session.begin_nested():
                    await outbox.add(kept[2])

        published = published_names(amqp_url)
        await eventually(published, until=lambda seen: len(seen) >= len(kept))
        await eventually(lambda: outbox_rows(db, tenant), until=lambda rows: not rows)
        assert sorted(await published()) == sorted(e.name for e in kept)

    async def test_a_transaction_the_database_aborted_publishes_nothing(
        self,
        campaign_app: FastAPI,
        amqp_url: str,
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        """A statement failed and its error was caught: the database rolls the transaction back
        at COMMIT, so the commit raises, and the event of a row that does not exist stays."""

        def event(name: str) -> CampaignCreated:
            return named_event(tenant, name)

        async with campaign_app.state.sessionmaker() as session:
            outbox = OutboxRepository(session)
            await outbox.add(event("aborted"))
            with contextlib.suppress(DBAPIError):
                await session.execute(text("SELECT 1 / 0"))
            try:
                await session.commit()
            except TransactionAborted as exc:
                refused: TransactionAborted | None = exc
            else:
                refused = None
            await session.rollback()
            await outbox.add(event("kept"))  # committed after: it shows the relay has spoken
            await session.commit()

        published = published_names(amqp_url)
        await eventually(published, until=lambda seen: "kept" in seen)
        await eventually(lambda: outbox_rows(db, tenant), until=lambda rows: not rows)
        assert await published() == ["kept"]
        assert refused is not None

    async def test_a_burst_beyond_what_the_fast_path_holds_is_published_once(
        self,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        db: asyncpg.Connection,
        tenant: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # The fast path holds ten batches: twenty messages; the other ten are the poll's.
        settings = make_campaign_settings(database_url, amqp_url, outbox_batch_size=2)
        events = [
            CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name=f"burst {n}")
            for n in range(60)
        ]
        async with running_campaigns(settings, user_client) as (app, _):
            for burst in (events[:30], events[30:]):  # overflowing twice
                async with app.state.sessionmaker() as session, session.begin():
                    for event in burst:
                        await OutboxRepository(session).add(event)
            await eventually(lambda: outbox_rows(db, tenant), until=lambda rows: not rows)

        messages = await take_all(amqp_url, QUEUE)
        assert sorted(m.message_id or "" for m in messages) == sorted(
            str(e.event_id) for e in events
        )
        # One warning, not one a commit: under overload every request's commit overflows.
        [full] = [r for r in caplog.records if r.getMessage().startswith("outbox hand-over full")]
        assert full.rows == 10  # type: ignore[attr-defined]

    async def test_a_published_row_whose_delete_failed_is_published_again_not_lost(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
        db: asyncpg.Connection,
        tenant: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        delete = OutboxRepository.delete
        calls = 0

        async def delete_failing_once(self: OutboxRepository, ids: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionResetError("the database blinked")
            await delete(self, ids)

        monkeypatch.setattr(OutboxRepository, "delete", delete_failing_once)

        campaign = await create_campaign(campaign_client, headers, "sent twice")
        await eventually(
            lambda: outbox_rows(db, tenant), until=lambda rows: not rows, what="the poll's copy"
        )

        messages = await take_all(amqp_url, "worker.campaign.created")
        assert [json.loads(m.body)["campaign_id"] for m in messages] == [campaign["id"]] * 2
        assert messages[0].message_id == messages[1].message_id  # the worker keeps one

    @pytest.mark.parametrize(
        ("late", "by_writer"),
        [
            (1.0, True),  # within half the claim window: the writer's to publish
            (4.5, False),  # past the window: the poll's, and the writer leaves them alone
        ],
    )
    async def test_each_row_is_published_once_by_its_writer_or_by_a_poll(
        self,
        late: float,
        by_writer: bool,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        headers: dict[str, str],
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        """The writer's fast path is held back ``late`` seconds while another replica polls
        every 50 ms."""
        settings = make_campaign_settings(
            database_url,
            amqp_url,
            outbox_poll_interval_seconds=0.05,
            outbox_claim_after_seconds=4.0,
        )
        async with (
            running_campaigns(settings, user_client) as (writer, client),
            running_campaigns(settings, user_client) as (other, _),
        ):
            relay = writer.state.relay
            publish_now = relay.publish_handed_over

            async def publish_late() -> int:
                await asyncio.sleep(late)
                published: int = await publish_now()
                return published

            relay.publish_handed_over = publish_late
            campaigns = [await create_campaign(client, headers, f"once {n}") for n in range(5)]
            await eventually(lambda: outbox_rows(db, tenant), until=lambda rows: not rows)
            by_each = [
                await value(app, "outbox_published_messages_total") for app in (writer, other)
            ]

        messages = await take_all(amqp_url, "worker.campaign.created")
        assert sorted(json.loads(m.body)["campaign_id"] for m in messages) == sorted(
            c["id"] for c in campaigns
        )
        assert by_each == ([5, 0] if by_writer else [0, 5])

    async def test_a_pass_confirming_more_than_asyncpg_takes_parameters_deletes_its_rows(
        self, db_engine: AsyncEngine, db: asyncpg.Connection, tenant: str
    ) -> None:
        """A pass may confirm up to ten batches (``OUTBOX_BATCH_SIZE`` up to 10,000): more ids
        than asyncpg takes parameters in one statement (32,767)."""
        sessionmaker = create_sessionmaker(db_engine)
        events = [
            CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name=f"many {n}")
            for n in range(3)
        ]
        async with sessionmaker() as session, session.begin():
            for created in events:
                await OutboxRepository(session).add(created)
        assert len(await outbox_rows(db, tenant)) == 3
        published = [row["id"] for row in await outbox_rows(db, tenant)] + [
            uuid.uuid4() for _ in range(40_000)
        ]

        async with sessionmaker() as session, session.begin():
            await OutboxRepository(session).delete(published)

        assert await outbox_rows(db, tenant) == []

    async def test_a_slow_pass_leaves_to_the_poll_what_it_no_longer_owns(
        self,
        database_url: str,
        amqp_url: str,
        user_client: httpx.AsyncClient,
        db: asyncpg.Connection,
        tenant: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """The writer's broker confirms slowly (1.5 s a batch of 2) while another replica polls
        every 50 ms: one commit of 10 events takes the writer's fast path 7.5 s, past the claim
        window (4 s). It deletes what it published as it goes, and what has gone stale by the
        time a batch starts is the poll's: each event is published once. (One publishing
        connection: the slowed broker is then the writer's only one.)"""
        settings = make_campaign_settings(
            database_url,
            amqp_url,
            outbox_publish_connections=1,
            outbox_batch_size=2,
            outbox_poll_interval_seconds=0.05,
            outbox_claim_after_seconds=4.0,
        )
        async with (
            running_campaigns(settings, user_client) as (writer, _),
            running_campaigns(settings, user_client) as (other, _),
        ):
            broker = writer.state.broker
            publish_now = broker.publish

            async def publish_slowly(*args: Any, **options: Any) -> Any:
                await asyncio.sleep(1.5)
                return await publish_now(*args, **options)

            broker.publish = publish_slowly
            events = [
                CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name=f"slow {n}")
                for n in range(10)
            ]
            async with writer.state.sessionmaker() as session, session.begin():
                for created in events:
                    await OutboxRepository(session).add(created)
            await eventually(
                lambda: outbox_rows(db, tenant), until=lambda rows: not rows, timeout=20
            )
            by_each = [
                await value(app, "outbox_published_messages_total") for app in (writer, other)
            ]

        messages = await take_all(amqp_url, "worker.campaign.created")
        assert sorted(str(m.message_id) for m in messages) == sorted(
            str(e.event_id) for e in events
        )
        assert sum(by_each) == 10
        assert by_each[1] > 0  # the poll took what the slow writer no longer owned
        # Said, with how many it left (at most once every ten seconds).
        behind = [
            r.rows  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage().startswith("outbox fast path behind")
        ]
        assert behind
        assert all(rows > 0 for rows in behind)


def count_statements(engine: AsyncEngine, prefix: str) -> list[str]:
    """The statements starting with ``prefix`` that ``engine`` runs from now on."""
    seen: list[str] = []

    def note(*args: Any) -> None:
        statement: str = args[2]
        if statement.startswith(prefix):
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", note)
    return seen


@asynccontextmanager
async def running_campaigns(
    settings: CampaignServiceSettings, user_client: httpx.AsyncClient
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_campaign_app(settings, jwks_client=user_client)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=CAMPAIGN_SERVICE_URL
        ) as client,
    ):
        await wait_ready(app)
        yield app, client


class TestBrokerOutage:
    async def test_campaign_created_while_rabbitmq_is_down_is_processed_when_it_returns(
        self,
        private_rabbit: PrivateRabbitNode,
        database_url: str,
        user_client: httpx.AsyncClient,
        db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        campaigns = create_campaign_app(
            make_campaign_settings(database_url, private_rabbit.url), jwks_client=user_client
        )
        worker = create_worker_app(make_worker_settings(database_url, private_rabbit.url))
        headers = await login_headers(user_client, tenant)
        async with (
            campaigns.router.lifespan_context(campaigns),
            worker.router.lifespan_context(worker),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=campaigns), base_url=CAMPAIGN_SERVICE_URL
            ) as client,
        ):
            await wait_ready(campaigns)
            await wait_ready(worker)

            await private_rabbit.stop_app()
            try:
                campaign = await create_campaign(client, headers, "during the outage")
                ready = await client.get("/ready")
                stored = await db.fetchval(
                    "SELECT count(*) FROM campaigns WHERE id = $1", uuid.UUID(campaign["id"])
                )
                pending = await outbox_rows(db, tenant)
            finally:
                await private_rabbit.start_app()

            assert ready.status_code == 503
            assert ready.json()["checks"]["broker"] == "unreachable"
            assert stored == 1
            assert [json.loads(row["payload"])["campaign_id"] for row in pending] == [
                campaign["id"]
            ]
            jobs = await wait_for_jobs(client, headers, campaign["id"], timeout=40)
            assert steps(jobs) == [("success", 1)]
            assert await outbox_rows(db, tenant) == []
