"""What an operator does with ``campaign.deadletter``: the ``deadletters`` tool (list, replay,
purge), run as its console users run it, and the RabbitMQ UI's "Move messages", on the real
broker and database with a worker running. Rounds of four attempts, as the defaults."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aio_pika
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from deadletters.letters import Selection
from deadletters.session import DeadLetterSession, replay
from shared.events import CampaignCreated
from shared.messaging import (
    ATTEMPT_HEADER,
    DEAD_LETTER_MARK_HEADER,
    LEGACY_DEAD_LETTER_MARK_HEADER,
    create_broker,
)
from tests.pipeline.conftest import make_worker_settings
from tests.support.campaigns import create_campaign, jobs_of, steps, wait_for_jobs
from tests.support.metrics import outcomes, value
from tests.support.polling import eventually
from tests.support.processes import ROOT, free_port
from tests.support.rabbit import RabbitAdmin, publish_raw
from worker.settings import WorkerSettings

ATTEMPTS = 4
DLQ = "campaign.deadletter"
FAILED_ROUND = [("retry", 1), ("retry", 2), ("retry", 3), ("failed", 4)]
# The first round fails, the replay succeeds on its first attempt, the fifth.
REPLAYED_TO_SUCCESS = [*FAILED_ROUND, ("success", 5)]

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def worker_settings(database_url: str, amqp_url: str) -> WorkerSettings:
    return make_worker_settings(
        database_url, amqp_url, worker_max_attempts=ATTEMPTS, worker_retry_delays_seconds=(0.2,)
    )


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def deadletters(amqp_url: str, database_url: str) -> Any:
    """``python -m deadletters ARGS`` against this test's broker vhost and database."""

    async def run(*args: str, **env: str) -> Run:
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "DATABASE_"))},
            "ENVIRONMENT": "test",
            "RABBITMQ_URL": amqp_url,
            "DATABASE_URL": database_url,
            "DEADLETTERS_CONNECT_TIMEOUT_SECONDS": "5",
            **env,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deadletters",
            *args,
            cwd=ROOT,
            env=environment,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        assert process.returncode is not None
        return Run(process.returncode, out.decode(), err.decode())

    return run


async def dead_letter_ids(rabbit_admin: RabbitAdmin, vhost: str, count: int) -> list[str]:
    """The message ids in the dead-letter queue, in order, once there are ``count``."""
    messages = await eventually(
        lambda: rabbit_admin.peek(vhost, DLQ, count=count + 10),
        until=lambda found: len(found) >= count,
        timeout=20,
        what=f"{count} dead letters",
    )
    return [message["properties"].get("message_id") for message in messages]


async def put(
    amqp_url: str, queue: str, document: Any, *, message_id: str, headers: Any = None
) -> None:
    """A JSON message straight into one queue (the default exchange), as a script would."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(document).encode(), message_id=message_id, headers=headers),
            routing_key=queue,
        )


async def queue_is_empty(rabbit_admin: RabbitAdmin, vhost: str) -> None:
    await eventually(
        lambda: rabbit_admin.peek(vhost, DLQ),
        until=lambda found: found == [],
        timeout=10,
        what="an empty dead-letter queue",
    )


@pytest.fixture
def dead(campaign_client: httpx.AsyncClient, rabbit_admin: RabbitAdmin, vhost: str) -> Any:
    """``await dead(headers, name)``: a campaign that fails its first round, its id and event
    id once its message is in the dead-letter queue."""

    async def make(headers: dict[str, str], name: str) -> tuple[str, str]:
        campaign = await create_campaign(campaign_client, headers, name)
        jobs = await wait_for_jobs(
            campaign_client, headers, campaign["id"], final="failed", timeout=20
        )
        assert steps(jobs) == FAILED_ROUND
        event_id = jobs[0]["event_id"]
        await eventually(
            lambda: rabbit_admin.peek(vhost, DLQ, count=100),
            until=lambda found: any(m["properties"].get("message_id") == event_id for m in found),
            timeout=10,
            what=f"event {event_id} in the dead-letter queue",
        )
        return campaign["id"], event_id

    return make


async def trace_ids(db: asyncpg.Connection, campaign_id: str) -> set[str]:
    rows = await db.fetch(
        "SELECT trace_id FROM campaign_job_logs WHERE campaign_id = $1", uuid.UUID(campaign_id)
    )
    return {row["trace_id"] for row in rows}


class TestList:
    async def test_lists_without_disturbing_the_queue(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        other_headers: dict[str, str],
        tenant: str,
        other_tenant: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        amqp_url: str,
        deadletters: Any,
        dead: Any,
    ) -> None:
        first, first_event = await dead(headers, "one [fail:always]")
        second, _ = await dead(other_headers, "two [fail:always]")
        await publish_raw(amqp_url, b"{not json", message_id="by-hand")
        before = await dead_letter_ids(rabbit_admin, vhost, 3)

        listed = await deadletters("list", "--json")
        only_tenant = await deadletters("list", "--tenant", tenant, "--json")
        poison = await deadletters("list", "--error-type", "PoisonMessage")
        limited = await deadletters("list", "--limit", "1", "--json")
        table = await deadletters("list")

        assert listed.code == 0, listed.stderr
        letters = json.loads(listed.stdout)
        assert [letter["message_id"] for letter in letters] == before
        one = letters[0]
        assert one["event_id"] == first_event
        assert (one["tenant_id"], one["campaign_id"]) == (tenant, first)
        assert one["attempts"] == ATTEMPTS
        assert one["error_type"] == "SimulatedFailure"
        assert "attempt 4" in one["error_message"]
        assert one["died_at"] is not None
        assert (letters[1]["tenant_id"], letters[1]["campaign_id"]) == (other_tenant, second)
        assert letters[2]["valid_event"] is False
        assert [letter["event_id"] for letter in json.loads(only_tenant.stdout)] == [first_event]
        assert poison.stdout.count("PoisonMessage") == 1
        assert first_event not in poison.stdout
        assert len(json.loads(limited.stdout)) == 1
        assert first_event in table.stdout
        assert "3 dead letter(s)" in table.stdout
        # Every message is still there, in its order; nothing went back to the worker.
        assert await dead_letter_ids(rabbit_admin, vhost, 3) == before
        assert steps(await jobs_of(campaign_client, headers, first)) == FAILED_ROUND


class TestReplay:
    async def test_replays_a_filtered_subset_and_the_rest_stays(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        worker: FastAPI,
        db: asyncpg.Connection,
        deadletters: Any,
        dead: Any,
    ) -> None:
        flaky, flaky_event = await dead(headers, "flaky [fail:4]")
        _doomed, doomed_event = await dead(headers, "doomed [fail:always]")
        first_traces = await trace_ids(db, flaky)

        dry = await deadletters("replay", "--event-id", flaky_event, "--dry-run")
        assert dry.code == 0
        assert "would replay 1 dead letter(s)" in dry.stdout
        assert len(await dead_letter_ids(rabbit_admin, vhost, 2)) == 2
        replayed = await deadletters("replay", "--event-id", flaky_event)

        assert replayed.code == 0, replayed.stderr
        assert "replayed 1 dead letter(s)" in replayed.stdout
        jobs = await wait_for_jobs(campaign_client, headers, flaky, timeout=20)
        # A new round, numbered on: it succeeds on attempt 5, the first of the replay.
        assert steps(jobs) == REPLAYED_TO_SUCCESS
        # One trace for the campaign, across the replay; the tool logged the replay in it.
        assert await trace_ids(db, flaky) == first_traces
        [line] = [json.loads(line) for line in replayed.stderr.splitlines() if "replayed" in line]
        assert (line["event_id"], line["trace_id"]) == (flaky_event, next(iter(first_traces)))
        assert await value(worker, "worker_replayed_messages_total") == 1
        # The other dead letter was not touched.
        remaining = await deadletters("list", "--json")
        assert [letter["event_id"] for letter in json.loads(remaining.stdout)] == [doomed_event]

    async def test_a_replay_that_fails_again_is_dead_lettered_with_its_history(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        tenant: str,
        deadletters: Any,
        dead: Any,
    ) -> None:
        doomed, doomed_event = await dead(headers, "doomed [fail:always]")

        replayed = await deadletters("replay", "--tenant", tenant)

        assert replayed.code == 0, replayed.stderr
        jobs = await eventually(
            lambda: jobs_of(campaign_client, headers, doomed),
            until=lambda rows: len(rows) == 8,
            timeout=20,
            what="a second round of four attempts",
        )
        assert steps(jobs) == [
            *FAILED_ROUND,
            ("retry", 5),
            ("retry", 6),
            ("retry", 7),
            ("failed", 8),
        ]
        listed = await eventually(
            lambda: deadletters("list", "--json"),
            until=lambda run: bool(json.loads(run.stdout)),
            timeout=10,
            what="the event dead-lettered again",
        )
        [letter] = json.loads(listed.stdout)
        assert (letter["event_id"], letter["attempts"]) == (doomed_event, 8)
        assert "attempt 8" in letter["error_message"]

    async def test_an_event_that_already_succeeded_is_acknowledged_unrun(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        worker: FastAPI,
        amqp_url: str,
        deadletters: Any,
        executions: list[CampaignCreated],
    ) -> None:
        campaign = await create_campaign(campaign_client, headers, "done already")
        [job] = await wait_for_jobs(campaign_client, headers, campaign["id"])
        assert len(executions) == 1
        # A duplicate of its event sits in the dead-letter queue.
        await put(
            amqp_url,
            DLQ,
            job["payload"],
            message_id=job["event_id"],
            headers={ATTEMPT_HEADER: 1, DEAD_LETTER_MARK_HEADER: True},
        )
        await dead_letter_ids(rabbit_admin, vhost, 1)

        replayed = await deadletters("replay", "--all")

        assert replayed.code == 0, replayed.stderr
        await eventually(
            lambda: outcomes(worker),
            until=lambda seen: seen.get("duplicate", 0) == 1,
            timeout=10,
            what="the replay acknowledged as a duplicate",
        )
        assert len(executions) == 1  # not run again
        assert steps(await jobs_of(campaign_client, headers, campaign["id"])) == [("success", 1)]
        await queue_is_empty(rabbit_admin, vhost)

    async def test_a_crash_between_publish_and_removal_duplicates_and_loses_nothing(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        amqp_url: str,
        worker: FastAPI,
        deadletters: Any,
        dead: Any,
    ) -> None:
        flaky, flaky_event = await dead(headers, "flaky [fail:4]")
        broker = create_broker(amqp_url, app_id="deadletters-test")
        await broker.connect()
        try:
            async with DeadLetterSession.open(broker) as session:
                scan = await session.scan(Selection(), scan_max=10, limit=None)
                # The tool loses its hold on the dead-letter queue between the confirmed
                # publish and the removal (its channel closes, as in a crash).
                await scan.matching[0].message.channel.close()
                with pytest.raises(Exception):  # noqa: B017, PT011  (whatever the ack raises)
                    await replay(scan.matching, broker=broker, confirm_seconds=5)
        finally:
            await broker.stop()

        jobs = await wait_for_jobs(campaign_client, headers, flaky, timeout=20)
        assert steps(jobs) == REPLAYED_TO_SUCCESS
        # The original is still in the queue: nothing was lost, and replaying it again runs
        # nothing twice.
        assert await dead_letter_ids(rabbit_admin, vhost, 1) == [flaky_event]
        again = await deadletters("replay", "--all")
        assert again.code == 0, again.stderr
        await queue_is_empty(rabbit_admin, vhost)
        await eventually(
            lambda: outcomes(worker),
            until=lambda seen: seen.get("duplicate", 0) == 1,
            timeout=10,
            what="the second replay acknowledged as a duplicate",
        )
        assert steps(await jobs_of(campaign_client, headers, flaky)) == REPLAYED_TO_SUCCESS


class TestPurge:
    async def test_purge_removes_and_records_each_event_once(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        other_tenant: str,
        rabbit_admin: RabbitAdmin,
        vhost: str,
        amqp_url: str,
        db: asyncpg.Connection,
        deadletters: Any,
        dead: Any,
    ) -> None:
        doomed, _ = await dead(headers, "doomed [fail:always]")
        # An event the broker dead-lettered by itself (past the delivery limit): no row yet.
        campaign = await create_campaign(campaign_client, headers, "stuck")
        [job] = await wait_for_jobs(campaign_client, headers, campaign["id"])
        await db.execute(
            "DELETE FROM campaign_job_logs WHERE event_id = $1", uuid.UUID(job["event_id"])
        )
        # A duplicate of an event that succeeded, and an event claiming another tenant's campaign.
        done = await create_campaign(campaign_client, headers, "done already")
        [done_job] = await wait_for_jobs(campaign_client, headers, done["id"])
        forged = {**job["payload"], "event_id": str(uuid.uuid4()), "tenant_id": other_tenant}
        for payload in (job["payload"], done_job["payload"], forged):
            await put(amqp_url, DLQ, payload, message_id=payload["event_id"])
        await publish_raw(amqp_url, b"{not json", message_id="by-hand")
        await dead_letter_ids(rabbit_admin, vhost, 5)

        unconfirmed = await deadletters("purge", "--all")
        assert unconfirmed.code == 2
        assert "--yes" in unconfirmed.stderr
        assert len(await dead_letter_ids(rabbit_admin, vhost, 5)) == 5
        purged = await deadletters("purge", "--all", "--yes")

        assert purged.code == 0, purged.stderr
        assert "purged 5 dead letter(s); 1 recorded as failed" in purged.stdout
        await queue_is_empty(rabbit_admin, vhost)
        assert steps(await jobs_of(campaign_client, headers, campaign["id"])) == [("failed", 1)]
        [stuck] = await jobs_of(campaign_client, headers, campaign["id"])
        assert stuck["last_error"] == "purged"
        # The dead-lettered campaign keeps its own final row and gets no second one; the one
        # that succeeded stays a success; nothing is written for another tenant's campaign.
        assert steps(await jobs_of(campaign_client, headers, doomed)) == FAILED_ROUND
        assert steps(await jobs_of(campaign_client, headers, done["id"])) == [("success", 1)]
        forged_rows = await db.fetchval(
            "SELECT count(*) FROM campaign_job_logs WHERE event_id = $1",
            uuid.UUID(forged["event_id"]),
        )
        assert forged_rows == 0


async def move_messages_back(rabbit_admin: RabbitAdmin, vhost: str) -> None:
    """What the management UI's "Move messages" does (the shovel management plugin)."""
    name = f"Move from {DLQ}"
    response = await rabbit_admin.http.put(
        f"/parameters/shovel/{quote(vhost, safe='')}/{quote(name, safe='')}",
        json={
            "component": "shovel",
            "vhost": vhost,
            "name": name,
            "value": {
                "src-uri": f"amqp:///{quote(vhost, safe='')}",
                "src-queue": DLQ,
                "src-protocol": "amqp091",
                "src-prefetch-count": 1000,
                "src-delete-after": "queue-length",
                "dest-protocol": "amqp091",
                "dest-uri": f"amqp:///{quote(vhost, safe='')}",
                "dest-add-forward-headers": False,
                "ack-mode": "on-confirm",
                "dest-queue": "worker.campaign.created",
            },
        },
    )
    assert response.status_code in (201, 204), response.text


class TestTheRabbitMQUI:
    async def test_move_messages_back_is_a_replay(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        worker: FastAPI,
        db: asyncpg.Connection,
        dead: Any,
    ) -> None:
        flaky, _ = await dead(headers, "flaky [fail:4]")
        first_traces = await trace_ids(db, flaky)

        await move_messages_back(rabbit_admin, vhost)

        jobs = await wait_for_jobs(campaign_client, headers, flaky, timeout=20)
        assert steps(jobs) == REPLAYED_TO_SUCCESS
        assert await trace_ids(db, flaky) == first_traces
        assert await value(worker, "worker_replayed_messages_total") == 1
        await queue_is_empty(rabbit_admin, vhost)

    async def test_moving_back_what_the_broker_dead_lettered_is_a_replay(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        amqp_url: str,
        db: asyncpg.Connection,
        worker: FastAPI,
    ) -> None:
        # An event the broker took out of the worker's queue at its delivery limit (a worker
        # crashing on it): no worker header, the broker's death record only.
        campaign = await create_campaign(campaign_client, headers, "crashed the worker")
        [job] = await wait_for_jobs(campaign_client, headers, campaign["id"])
        await db.execute(
            "DELETE FROM campaign_job_logs WHERE event_id = $1", uuid.UUID(job["event_id"])
        )
        death: Any = {
            "count": 1,
            "reason": "delivery_limit",
            "queue": "worker.campaign.created",
            "time": datetime.now(UTC).replace(microsecond=0),
            "exchange": "campaigns",
            "routing-keys": ["campaign.created"],
        }
        await put(
            amqp_url, DLQ, job["payload"], message_id=job["event_id"], headers={"x-death": [death]}
        )

        await move_messages_back(rabbit_admin, vhost)

        jobs = await wait_for_jobs(campaign_client, headers, campaign["id"], timeout=20)
        assert steps(jobs) == [("success", 2)]  # a round of its own, after the attempt it died at
        assert await value(worker, "worker_replayed_messages_total") == 1


class TestUpgrade:
    async def test_a_copy_an_earlier_version_meant_to_dead_letter_is_not_run(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        amqp_url: str,
        executions: list[CampaignCreated],
    ) -> None:
        # Earlier versions sent their dead letters through the worker's own queue, marked, to
        # reject them there; a deploy can leave such a copy in the queue.
        flaky = await create_campaign(campaign_client, headers, "flaky [fail:4]")
        [job] = await wait_for_jobs(campaign_client, headers, flaky["id"], final="retry")
        await put(
            amqp_url,
            "worker.campaign.created",
            job["payload"],
            message_id=job["event_id"],
            headers={
                ATTEMPT_HEADER: ATTEMPTS,
                "x-last-error-type": "SimulatedFailure",
                LEGACY_DEAD_LETTER_MARK_HEADER: True,
            },
        )

        [message] = await eventually(
            lambda: rabbit_admin.peek(vhost, DLQ),
            until=lambda found: any(
                m["properties"].get("message_id") == job["event_id"] for m in found
            ),
            timeout=10,
            what="the old copy in the dead-letter queue",
        )

        assert message["properties"]["headers"]["x-death"][0]["reason"] == "rejected"
        # Only the campaign's own round ran; the copy was not executed.
        jobs = await wait_for_jobs(campaign_client, headers, flaky["id"], final="failed")
        assert steps(jobs) == FAILED_ROUND
        event_id = uuid.UUID(job["event_id"])
        assert sum(1 for event in executions if event.event_id == event_id) == ATTEMPTS


class TestOutput:
    async def test_headers_cannot_forge_rows_or_drive_the_terminal(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        rabbit_admin: RabbitAdmin,
        vhost: str,
        amqp_url: str,
        deadletters: Any,
    ) -> None:
        await put(
            amqp_url,
            DLQ,
            {},
            message_id="hostile",
            headers={
                "x-last-error-type": "Boom",
                "x-last-error-message": "\x1b[2Jgone\nfake-event  acme  row",
                ATTEMPT_HEADER: bytearray(b"\xff"),
            },
        )
        await dead_letter_ids(rabbit_admin, vhost, 1)

        table = await deadletters("list")

        assert table.code == 0, table.stderr
        assert "\x1b" not in table.stdout
        lines = table.stdout.splitlines()
        assert len(lines) == 3  # the header, one row, the count
        assert "\\x1b[2Jgone\\nfake-event" in lines[1]


class TestErrors:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["replay"], "needs a filter"),
            (["purge", "--yes"], "needs a filter"),
            (["replay", "--all", "--tenant", "acme"], "without filters"),
            (["list", "--tenant", "Not A Tenant"], "tenant id"),
            (["list", "--event-id", "42"], "UUID"),
            (["list", "--error-type", "a b"], "error type"),
            (["list", "--limit", "0"], "whole number"),
            (["list", "--limit", "many"], "whole number"),
        ],
    )
    async def test_invalid_arguments(self, deadletters: Any, args: list[str], message: str) -> None:
        run = await deadletters(*args)

        assert run.code == 2
        assert message in run.stderr

    async def test_unreachable_broker(self, deadletters: Any) -> None:
        run = await deadletters(
            "list", RABBITMQ_URL=f"amqp://guest:secret-pw@127.0.0.1:{free_port()}/"
        )

        assert run.code == 69
        assert "cannot reach RabbitMQ at 127.0.0.1" in run.stderr
        assert "secret-pw" not in run.stderr

    async def test_unreachable_database(self, deadletters: Any) -> None:
        url = f"postgresql+asyncpg://postgres:secret-pw@127.0.0.1:{free_port()}/campaigns"

        run = await deadletters("purge", "--all", "--yes", DATABASE_URL=url)

        assert run.code == 69
        assert "cannot reach PostgreSQL at 127.0.0.1" in run.stderr
        assert "secret-pw" not in run.stderr

    async def test_settings_errors_show_no_secret(self, deadletters: Any) -> None:
        run = await deadletters(
            "list",
            ENVIRONMENT="production",
            DATABASE_URL="postgresql+asyncpg://app:Zx9-VerySecret@db.internal/campaigns",
            RABBITMQ_URL="amqp://guest:guest@mq.internal/",
        )

        assert run.code == 78
        assert "RABBITMQ_URL must name a user other than guest" in run.stderr
        assert "Zx9-VerySecret" not in run.stderr + run.stdout

    async def test_no_dead_letter_queue(
        self, deadletters: Any, rabbit_admin: RabbitAdmin, vhost: str
    ) -> None:
        await rabbit_admin.http.delete(f"/queues/{quote(vhost, safe='')}/{DLQ}")

        run = await deadletters("list")

        assert run.code == 69
        assert "there is no campaign.deadletter queue" in run.stderr
