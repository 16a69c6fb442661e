"""Failure drills on a three-node RabbitMQ cluster behind haproxy (see conftest.py): nodes die and
come back while campaigns are created at a steady rate and processed, and nothing accepted is
lost or processed twice.

Each phase: the disruption; processing goes on without the node (campaigns created after it are
processed); the node comes back; every campaign accepted so far is processed. It reports how long
processing stalled (the longest time no campaign was processed: with two workers one may carry
on while the other reconnects), each worker's own longest pause, the longest a campaign of the
phase waited for its row, and the publishes the broker refused (RabbitMQ before 3.12 refuses
every publish of a channel opened while the queue's leader was going away, until that node
returns: the outbox publishes those events again, later; docs/cluster.md)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
import httpx
import pytest

from tests.cluster.conftest import QUEUE, ClusterPlatform, report
from tests.support.campaigns import login_headers
from tests.support.cluster import RabbitCluster
from tests.support.drills import CampaignLoad, Progress, longest_gap, now
from tests.support.polling import eventually
from tests.support.processes import ServiceProcess
from tests.support.rabbit import PrivateRabbitNode

RATE = 20  # campaigns created per second during the drills
pytestmark = pytest.mark.timeout(420)  # the module's set-up (about 30 s) counts in the first


async def all_members_online(cluster: RabbitCluster) -> None:
    """Every node runs (those a test left down are started), in one cluster, and every queue has
    an online member on each."""
    await cluster.start_down_nodes()
    await cluster.wait_running(len(cluster.nodes))
    names = sorted(node.name for node in cluster.nodes)

    await eventually(
        cluster.all_replicas,
        until=lambda queues: (
            bool(queues) and all(r.members == names and r.online == names for r in queues.values())
        ),
        timeout=60,
        interval=0.5,
        what="every queue with an online member on each node",
    )


def worker_pause(worker: ServiceProcess, start: datetime, end: datetime) -> float:
    """The worker's longest pause between two campaigns executed, from its log."""
    times = sorted(
        datetime.fromisoformat(line["timestamp"]) for line in worker.logged("campaign executed")
    )
    return longest_gap(times, start, end)


def refused_publishes(platform: ClusterPlatform, start: datetime, end: datetime) -> int:
    """Publishes of campaign_service's outbox that the broker refused (nacked) in the window."""
    return sum(
        start <= datetime.fromisoformat(line["timestamp"]) <= end
        for line in platform.campaigns.log_lines()
        if str(line.get("message", "")).startswith("broker refused an outbox message")
    )


async def costs(
    platform: ClusterPlatform, progress: Progress, start: datetime, end: datetime
) -> str:
    stalled, slowest = await progress.stall(start, end)
    pauses = ", ".join(f"{worker_pause(worker, start, end):.1f}" for worker in platform.workers)
    return (
        f"processing stalled {stalled:.1f} s (each worker's own pause {pauses} s),"
        f" slowest campaign {slowest:.1f} s,"
        f" publishes refused {refused_publishes(platform, start, end)}"
    )


async def phase(
    platform: ClusterPlatform,
    progress: Progress,
    load: CampaignLoad,
    disrupt: Callable[[], Awaitable[None]],
) -> str:
    """Disrupt; see processing go on; bring every node back; see every campaign accepted so
    far processed. What it cost (from before the disruption)."""
    start = now()
    await disrupt()
    # Processing goes on: counted among campaigns created once ``disrupt`` returned (the node is
    # gone then), not from ``start``, which would count those processed before it went.
    disrupted = now()
    await progress.wait_resumed(load, since=disrupted, count=2 * RATE)
    await all_members_online(platform.cluster)
    await progress.wait_caught_up(load, since=start)
    return await costs(platform, progress, start, now())


async def everything_settled(
    cluster: RabbitCluster, progress: Progress, load: CampaignLoad, timeout: float = 90
) -> None:
    """Every accepted campaign processed, and nothing left in the queue: none ready, none
    delivered and unacknowledged."""
    accepted = list(load.accepted)
    await eventually(
        lambda: progress.processed(accepted),
        until=lambda n: n == len(accepted),
        timeout=timeout,
        interval=0.5,
        what="every accepted campaign processed",
    )
    await eventually(
        lambda: cluster.queue_counts(QUEUE),
        until=lambda counts: counts == (0, 0),
        timeout=30,
        interval=0.5,
        what=f"{QUEUE} empty, nothing unacknowledged",
    )


async def assert_each_processed_once(
    cluster: RabbitCluster, progress: Progress, load: CampaignLoad
) -> None:
    successes = await progress.successes_per_campaign()

    assert load.refused == []
    assert load.accepted
    assert set(load.accepted) <= set(successes)
    assert {successes[id_] for id_ in load.accepted} == {1}
    assert max(successes.values()) == 1  # no campaign of the tenant has two
    assert await progress.statuses() == {"success"}  # no retry, nothing failed
    assert await cluster.queue_counts("campaign.deadletter") == (0, 0)
    assert await progress.outbox_rows() == 0


class TestNodeLoss:
    async def test_leader_killed_then_the_workers_node_stopped_loses_and_repeats_nothing(
        self,
        platform: ClusterPlatform,
        campaign_api: httpx.AsyncClient,
        user_client: httpx.AsyncClient,
        cluster_db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        cluster = platform.cluster
        # The queues the services declared through haproxy: replicated on the three nodes.
        await all_members_online(cluster)
        load = CampaignLoad(campaign_api, await login_headers(user_client, tenant), RATE)
        progress = Progress(cluster_db, tenant)
        load.start()
        try:
            await progress.wait_caught_up(load, since=now())

            # (a) The node leading the queue dies without a word; a follower takes over.
            leader = cluster.node((await cluster.replicas(QUEUE)).leader)
            killed = await phase(platform, progress, load, lambda: cluster.kill(leader))
            new_leader = (await cluster.replicas(QUEUE)).leader

            # (b) The node the first worker is connected to (through haproxy) is stopped.
            assert platform.workers[0].process is not None
            worker_connection = f" pid {platform.workers[0].process.pid}"
            worker_node = await cluster.node_of_connection(worker_connection)
            leading = (await cluster.replicas(QUEUE)).leader == worker_node.name
            moved: list[PrivateRabbitNode | None] = []

            async def stop_and_see_the_worker_move() -> None:
                await cluster.stop(worker_node)
                moved.append(
                    await eventually(
                        lambda: cluster.find_connection(worker_connection),
                        until=lambda node: node not in (None, worker_node),
                        timeout=30,
                        what="worker 1 connected again",
                    )
                )

            stopped = await phase(platform, progress, load, stop_and_see_the_worker_move)
        finally:
            await load.stop()
        await everything_settled(cluster, progress, load)

        report(f"node loss drill, {len(load.accepted)} campaigns at {RATE}/s:")
        report(f"  (a) leader {leader.name} killed (new leader {new_leader}): {killed}")
        report(
            f"  (b) worker 1's node {worker_node.name}{' (leader)' if leading else ''} stopped,"
            f" worker 1 reconnected to {moved[0] and moved[0].name}: {stopped}"
        )
        assert new_leader != leader.name
        await assert_each_processed_once(cluster, progress, load)

    async def test_whole_cluster_restarted_while_the_outbox_holds_events_loses_nothing(
        self,
        platform: ClusterPlatform,
        campaign_api: httpx.AsyncClient,
        user_client: httpx.AsyncClient,
        cluster_db: asyncpg.Connection,
        tenant: str,
    ) -> None:
        cluster = platform.cluster
        await all_members_online(cluster)
        load = CampaignLoad(campaign_api, await login_headers(user_client, tenant), RATE)
        progress = Progress(cluster_db, tenant)
        load.start()
        try:
            await progress.wait_caught_up(load, since=now())

            stopped_at = now()
            await asyncio.gather(*(cluster.stop(node) for node in cluster.nodes))
            # Campaigns are still accepted: their events wait in the outbox.
            held = await eventually(
                progress.outbox_rows, until=lambda n: n >= 2 * RATE, timeout=30, what="events held"
            )
            not_ready = [(await campaign_api.get("/ready")).status_code]
            async with httpx.AsyncClient() as client:
                for worker in platform.workers:
                    not_ready.append((await client.get(f"{worker.url}/ready")).status_code)
            restarted_at = now()
            # All at once: a node that was not the last to stop waits for the others.
            await asyncio.gather(*(cluster.start_node(node) for node in cluster.nodes))
            await all_members_online(cluster)
            back_at = now()
            await progress.wait_caught_up(load, since=back_at)
            stalled = await costs(platform, progress, stopped_at, now())
        finally:
            await load.stop()
        await everything_settled(cluster, progress, load)

        report(
            f"cluster restart drill, {len(load.accepted)} campaigns at {RATE}/s: all nodes"
            f" stopped {(restarted_at - stopped_at).total_seconds():.1f} s (the outbox held"
            f" {held} events), back in {(back_at - restarted_at).total_seconds():.1f} s: {stalled}"
        )
        assert not_ready == [503, 503, 503]  # campaign_service and the two workers
        await assert_each_processed_once(cluster, progress, load)
