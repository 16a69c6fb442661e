"""Workers as their users run them (``python -m worker``), killed, stopped and multiplied; and a
database that goes away while a message is in hand."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from shared.events import CampaignCreated
from shared.messaging import ERROR_TYPE_HEADER
from tests.pipeline.conftest import TEST_RETRY_DELAYS, make_worker_settings, wait_ready
from tests.support.campaigns import create_campaign, jobs_of, steps, wait_for_jobs
from tests.support.metrics import outcomes, parse, value
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess
from tests.support.proxy import TcpProxy
from tests.support.rabbit import (
    PrivateRabbitNode,
    RabbitAdmin,
    consumer_count,
    publish_raw,
    queue_counts,
)
from tests.support.spans import Spans
from worker.app import create_app as create_worker_app

WorkerFactory = Callable[..., ServiceProcess]


@pytest.fixture
async def start_worker(
    database_url: str, amqp_url: str, tmp_path: Path
) -> AsyncIterator[WorkerFactory]:
    """Start ``python -m worker`` processes on this test's database and vhost."""
    started: list[ServiceProcess] = []

    def make(**env: str) -> ServiceProcess:
        worker = ServiceProcess.worker(
            {
                "DATABASE_URL": database_url,
                "RABBITMQ_URL": amqp_url,
                "WORKER_RETRY_DELAYS_SECONDS": ",".join(map(str, TEST_RETRY_DELAYS)),
                "WORKER_GRACEFUL_TIMEOUT_SECONDS": "10",
                **env,
            },
            tmp_path / f"worker-{len(started)}.log",
        )
        started.append(worker)
        return worker

    yield make
    for worker in started:
        await worker.stop()


async def worker_gauge(worker: ServiceProcess, name: str) -> float:
    """A gauge of the worker process right now, from its /metrics."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{worker.port}/metrics")
    return parse(response.text).get((name, frozenset()), 0.0)


class TestKilledWorker:
    async def test_message_in_hand_is_redelivered_and_processed_once(
        self,
        start_worker: WorkerFactory,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        db: asyncpg.Connection,
    ) -> None:
        slow = start_worker(WORKER_SIMULATED_WORK_SECONDS="30")
        await slow.start()
        await slow.wait_ready()
        campaign = await create_campaign(campaign_client, headers, "interrupted")
        await eventually(
            lambda: worker_gauge(slow, "worker_messages_in_flight"),
            until=lambda n: n == 1,
            what="the worker holding it",
        )

        slow.signal(signal.SIGKILL)
        await slow.wait()
        rescuer = start_worker()
        await rescuer.start()
        jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=20)

        assert steps(jobs) == [("success", 1)]
        [executed] = rescuer.logged("campaign executed")
        assert executed["redelivered"] is True
        assert executed["campaign_id"] == campaign["id"]
        assert slow.logged("campaign executed") == []
        count = await db.fetchval(
            "SELECT count(*) FROM campaign_job_logs WHERE campaign_id = $1 AND status = 'success'",
            uuid.UUID(campaign["id"]),
        )
        assert count == 1


class TestStoppedWorker:
    async def test_sigterm_finishes_the_message_in_hand_and_requeues_the_rest(
        self,
        start_worker: WorkerFactory,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
    ) -> None:
        # Five campaigns waiting before the worker starts, so that it takes them together: one
        # executed at a time, two seconds each. SIGTERM arrives with one of them under way and
        # four in the worker's hands, not started.
        campaigns = [await create_campaign(campaign_client, headers, f"c{i}") for i in range(5)]
        await eventually(
            lambda: queue_counts(amqp_url, "worker.campaign.created"),
            until=lambda counts: counts is not None and counts.ready == 5,
            what="the campaigns waiting in the queue",
        )
        worker = start_worker(
            WORKER_SIMULATED_WORK_SECONDS="2", WORKER_CONCURRENCY="1", WORKER_PREFETCH="5"
        )
        await worker.start()
        await worker.wait_ready()
        await eventually(
            lambda: worker_gauge(worker, "worker_executions_in_progress"),
            until=lambda n: n == 1,
            what="the first execution",
        )

        worker.signal(signal.SIGTERM)
        code = await worker.wait(timeout=15)

        # Graceful: it finished its work, then ended by the signal (status 143 to a supervisor).
        assert worker.logged("stopped")
        assert code == -signal.SIGTERM
        executed = worker.logged("campaign executed")
        assert len(executed) == 1  # the one under way finished: row written, acked
        # Nothing lost: another worker takes over the four the first one gave back.
        successor = start_worker()
        await successor.start()
        for campaign in campaigns:
            jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=20)
            assert steps(jobs) == [("success", 1)]


class TestCompetingConsumers:
    async def test_workers_share_the_queue(
        self,
        start_worker: WorkerFactory,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
    ) -> None:
        workers = [
            start_worker(WORKER_SIMULATED_WORK_SECONDS="0.2", WORKER_PREFETCH="2") for _ in range(2)
        ]
        for worker in workers:
            await worker.start()
        for worker in workers:
            await worker.wait_ready()
        attached = await consumer_count(amqp_url, "worker.campaign.created")

        campaigns = [await create_campaign(campaign_client, headers, f"c{i}") for i in range(12)]
        for campaign in campaigns:
            await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=20)

        assert attached == 2
        shares = [len(worker.logged("campaign executed")) for worker in workers]
        assert sum(shares) == 12
        assert all(share > 0 for share in shares), shares


class TestEnvironment:
    async def test_web_concurrency_in_the_environment_leaves_one_worker_serving(
        self,
        start_worker: WorkerFactory,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        amqp_url: str,
    ) -> None:
        """uvicorn reads WEB_CONCURRENCY, which platforms set for web servers; the worker
        runs one process whatever it says."""
        worker = start_worker(WEB_CONCURRENCY="2")
        await worker.start()
        await worker.wait_ready()

        campaign = await create_campaign(campaign_client, headers, "one process")
        jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=20)

        assert steps(jobs) == [("success", 1)]
        assert await consumer_count(amqp_url, "worker.campaign.created") == 1


def through(proxy: TcpProxy, database_url: str) -> str:
    parts = urlsplit(database_url)
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def db_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(database_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.close()


class TestDatabaseOutage:
    async def test_message_is_held_not_acked_not_dead_lettered_then_processed(
        self,
        db_proxy: TcpProxy,
        database_url: str,
        amqp_url: str,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        worker = create_worker_app(make_worker_settings(through(db_proxy, database_url), amqp_url))
        async with worker.router.lifespan_context(worker):
            await wait_ready(worker)
            db_proxy.down()
            campaign = await create_campaign(campaign_client, headers, "during the db outage")

            await eventually(
                lambda: value(worker, "worker_messages_in_flight"), until=lambda n: n == 1
            )
            await asyncio.sleep(1.0)  # the outage lasts; the worker keeps holding the message
            during: dict[str, Any] = {
                "jobs": await jobs_of(campaign_client, headers, campaign["id"]),
                "dead": await rabbit_admin.peek(vhost, "campaign.deadletter"),
                "outcomes": await outcomes(worker),
                "in_flight": await value(worker, "worker_messages_in_flight"),
            }
            db_proxy.up()

            jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=15)

        assert during["jobs"] == []
        assert during["dead"] == []
        assert during["in_flight"] == 1
        assert sum(during["outcomes"].values()) == 0  # nothing settled while the db was away
        assert steps(jobs) == [("success", 1)]  # no attempt was spent on the outage

    async def test_a_database_refusing_every_write_holds_the_message_then_it_is_written(
        self,
        database_url: str,
        amqp_url: str,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        db: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """As after a failover that leaves the worker's connections on a read-only node: the
        database refuses every INSERT, whatever its values. Not the event's fault: the worker
        holds it (it does not dead-letter a campaign it has executed), and writes its row on a
        new connection once the database takes writes again."""
        database = urlsplit(database_url).path.lstrip("/")
        campaign = await create_campaign(campaign_client, headers, "during the read-only spell")
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM outbox"),
            until=lambda n: n == 0,
            what="the event published and its outbox row deleted",
        )
        caplog.set_level(logging.ERROR, logger="worker.store")

        async def tries_and_dead_letters() -> tuple[int, int]:
            tries = sum("refuses the statement, not its values" in m for m in caplog.messages)
            return tries, len(await rabbit_admin.peek(vhost, "campaign.deadletter"))

        await db.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        try:
            # Its connections are opened from now on: read-only, as on a standby.
            worker = create_worker_app(make_worker_settings(database_url, amqp_url))
            async with worker.router.lifespan_context(worker):
                await wait_ready(worker)
                # The write tried again, or (what must not happen) the event dead-lettered.
                await eventually(
                    tries_and_dead_letters,
                    until=lambda seen: seen[0] >= 2 or seen[1] > 0,
                    what="the refused write tried again",
                )
                during: dict[str, Any] = {
                    "jobs": await jobs_of(campaign_client, headers, campaign["id"]),
                    "dead": await rabbit_admin.peek(vhost, "campaign.deadletter"),
                    "outcomes": await outcomes(worker),
                    "in_flight": await value(worker, "worker_messages_in_flight"),
                }
                await db.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
                jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=15)
        finally:
            await db.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')

        assert during["jobs"] == []
        assert during["dead"] == []
        assert during["in_flight"] == 1
        assert sum(during["outcomes"].values()) == 0  # nothing settled while writes were refused
        assert steps(jobs) == [("success", 1)]

    async def test_a_stopping_worker_requeues_what_it_holds(
        self,
        db_proxy: TcpProxy,
        database_url: str,
        amqp_url: str,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        worker = create_worker_app(make_worker_settings(through(db_proxy, database_url), amqp_url))
        async with worker.router.lifespan_context(worker):
            await wait_ready(worker)
            db_proxy.down()
            campaign = await create_campaign(campaign_client, headers, "held at shutdown")
            await eventually(
                lambda: value(worker, "worker_messages_in_flight"), until=lambda n: n == 1
            )
        stopped_outcomes = await outcomes(worker)
        db_proxy.up()

        # Given back at least once: the broker may hand it over again before the consumer's
        # cancel reaches it, and the stopping worker gives it back again.
        assert stopped_outcomes["requeued"] >= 1
        assert await rabbit_admin.peek(vhost, "campaign.deadletter") == []
        messages = await rabbit_admin.peek(vhost, "worker.campaign.created")
        assert [json.loads(m["payload"])["campaign_id"] for m in messages] == [campaign["id"]]


class TestStoreLifecycle:
    async def test_a_write_after_the_store_stopped_is_refused_not_lost(
        self, db_engine: Any, monkeypatch: pytest.MonkeyPatch, spans: Spans
    ) -> None:
        import uuid as uuid_module

        from opentelemetry.trace import StatusCode

        import worker.store
        from shared.events import CampaignCreated
        from shared.models import JobStatus
        from worker.store import JobLogStore, JobRow, ShuttingDown

        monkeypatch.setattr(worker.store, "tracer", spans.provider.get_tracer("test"))
        delivery = spans.provider.get_tracer("test").start_span("delivery")
        store = JobLogStore(db_engine, retry_max_seconds=0.1, stopping=asyncio.Event())
        await store.stop()
        event = CampaignCreated(tenant_id="late", campaign_id=uuid_module.uuid4(), name="late")
        row = JobRow(event, JobStatus.SUCCESS, 1, None, None)

        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(store.record([row], traces=[delivery]), 5)

        # The row's insert span says why it was not written, without calling a stop an error.
        [insert] = spans.finished()
        assert insert.name == "INSERT campaign_job_logs"
        assert insert.parent is not None
        assert insert.parent.span_id == delivery.get_span_context().span_id
        assert insert.attributes is not None
        assert insert.attributes["error.type"] == "ShuttingDown"
        assert insert.status.status_code is StatusCode.UNSET


def failing_once(
    method: Callable[..., Awaitable[Any]], bug: str
) -> tuple[Callable[..., Any], list[int]]:
    """``method``, except that its first call raises ``RuntimeError(bug)``; and the number of
    calls so far (a list of one, to read while the test runs)."""
    calls = [0]

    async def broken_once(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError(bug)
        return await method(*args)

    return broken_once, calls


class TestUnexpectedError:
    async def test_a_bug_gives_the_message_back_as_a_failed_delivery(
        self,
        monkeypatch: pytest.MonkeyPatch,
        database_url: str,
        amqp_url: str,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        from aio_pika import IncomingMessage

        from worker.store import JobLogStore

        rejected: list[bool] = []
        reject = IncomingMessage.reject

        async def spy_reject(message: IncomingMessage, requeue: bool = False) -> None:
            rejected.append(requeue)
            await reject(message, requeue=requeue)

        broken, _ = failing_once(JobLogStore.standings, "a bug in the worker")
        monkeypatch.setattr(JobLogStore, "standings", broken)
        monkeypatch.setattr(IncomingMessage, "reject", spy_reject)
        worker = create_worker_app(make_worker_settings(database_url, amqp_url))
        async with worker.router.lifespan_context(worker):
            await wait_ready(worker)
            campaign = await create_campaign(campaign_client, headers, "hits a bug once")
            jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=15)
            settled = await outcomes(worker)

        assert steps(jobs) == [("success", 1)]  # no attempt spent on the bug
        assert settled["requeued"] == 1
        assert settled["success"] == 1
        # basic.reject, which counts against the queue's delivery limit (basic.nack would not).
        assert rejected == [True]
        assert await rabbit_admin.peek(vhost, "campaign.deadletter") == []

    async def test_a_batch_that_fails_outright_is_given_back_not_acked_by_the_next(
        self,
        monkeypatch: pytest.MonkeyPatch,
        database_url: str,
        amqp_url: str,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        # A failure outside the processor's own handling (before it settles anything): the
        # consumer gives the batch back, so the next batch's ack(multiple=True) cannot cover it.
        from worker.processing import CampaignProcessor

        broken, calls = failing_once(CampaignProcessor.handle_batch, "a bug before any settling")
        monkeypatch.setattr(CampaignProcessor, "handle_batch", broken)
        worker = create_worker_app(make_worker_settings(database_url, amqp_url))
        async with worker.router.lifespan_context(worker):
            await wait_ready(worker)
            first = await create_campaign(campaign_client, headers, "in the failed batch")

            async def batches() -> int:
                return calls[0]

            await eventually(batches, until=lambda n: n >= 1, what="the failed batch")
            second = await create_campaign(campaign_client, headers, "in the next batch")
            jobs = [
                await wait_for_jobs(campaign_client, headers, c["id"], timeout=15)
                for c in (first, second)
            ]
            settled = await outcomes(worker)

        assert [steps(j) for j in jobs] == [[("success", 1)], [("success", 1)]]
        assert settled["requeued"] == 1
        assert settled["success"] == 2
        assert await rabbit_admin.peek(vhost, "campaign.deadletter") == []


class TestMixedBatch:
    async def test_every_kind_of_delivery_in_one_batch_is_settled_as_if_alone(
        self,
        start_worker: WorkerFactory,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        tenant: str,
        amqp_url: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
    ) -> None:
        # Queued while no worker runs, so they reach the worker together and share batches:
        # successes, a failure to retry, a body that is not JSON and an event of no campaign.
        fine = [await create_campaign(campaign_client, headers, f"fine {i}") for i in range(30)]
        flaky = await create_campaign(campaign_client, headers, "flaky [fail:1]")
        await publish_raw(amqp_url, b"\xff{not json")
        ghost = CampaignCreated(tenant_id=tenant, campaign_id=uuid.uuid4(), name="ghost")
        await publish_raw(amqp_url, ghost.model_dump_json().encode())
        await eventually(
            lambda: rabbit_admin.queue(vhost, "worker.campaign.created"),
            until=lambda queue: queue.get("messages", 0) == 33,
            timeout=20,
            what="all 33 messages queued",
        )

        worker = start_worker()
        await worker.start()
        for campaign in fine:
            jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=20)
            assert steps(jobs) == [("success", 1)]
        flaky_jobs = await wait_for_jobs(campaign_client, headers, flaky["id"], timeout=20)
        dead = await eventually(
            lambda: rabbit_admin.peek(vhost, "campaign.deadletter"),
            until=lambda messages: len(messages) >= 2,
            timeout=15,
            what="two dead letters",
        )
        # Everything settled: nothing left in the queue, nothing held unacknowledged.
        queue = await eventually(
            lambda: rabbit_admin.queue(vhost, "worker.campaign.created"),
            until=lambda q: q.get("messages", -1) == 0 and q.get("messages_unacknowledged") == 0,
            timeout=20,
            what="the worker's queue empty and nothing unacknowledged",
        )

        assert steps(flaky_jobs) == [("retry", 1), ("success", 2)]
        assert sorted(m["properties"]["headers"][ERROR_TYPE_HEADER] for m in dead) == [
            "PoisonMessage",
            "PoisonMessage",
        ]
        assert queue["messages_unacknowledged"] == 0
        assert await consumer_count(amqp_url, "worker.campaign.created") == 1  # still attached
        # One channel throughout: an ack that named a delivery already settled would have
        # made the broker close it ("unknown delivery tag") and the worker reconnect.
        log = worker.log_path.read_text()
        assert "unknown delivery tag" not in log
        assert "could not" not in log


class TestStoppedDuringBrokerOutage:
    async def test_sigterm_while_rabbitmq_is_down_stops_the_worker(
        self, start_worker: WorkerFactory, private_rabbit: PrivateRabbitNode
    ) -> None:
        worker = start_worker(RABBITMQ_URL=private_rabbit.url)
        await worker.start()
        await worker.wait_ready()

        await private_rabbit.stop_app()
        try:

            async def ready() -> int:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{worker.url}/ready")).status_code

            await eventually(ready, until=lambda code: code == 503, what="the outage noticed")
            worker.signal(signal.SIGTERM)
            # Stopping does not wait for the broker to come back (aio-pika would wait for the
            # reconnection to cancel the consumer).
            code = await worker.wait(timeout=20)
        finally:
            await private_rabbit.start_app()

        assert code == -signal.SIGTERM
        assert worker.logged("stopped")
