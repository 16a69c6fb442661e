"""What a failure drill needs around the platform: campaigns created at a steady rate, and what
the database says about their processing (caught up yet? how long did processing stall?)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from tests.support.polling import eventually


def now() -> datetime:
    return datetime.now(UTC)


class CampaignLoad:
    """``POST /campaigns`` at ``rate`` per second until stopped, one after the other (a slow
    answer delays the next). Remembers every campaign whose POST was answered 201, with its
    ``created_at``, and every other outcome."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str], rate: float) -> None:
        self._client = client
        self._headers = headers
        self._interval = 1 / rate
        self.accepted: dict[uuid.UUID, datetime] = {}
        self.refused: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="campaign-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        number = 0
        while True:
            number += 1
            try:
                response = await self._client.post(
                    "/campaigns", json={"name": f"drill {number}"}, headers=self._headers
                )
            except httpx.HTTPError as exc:
                self.refused.append(repr(exc))
            else:
                if response.status_code == 201:
                    body = response.json()
                    self.accepted[uuid.UUID(body["id"])] = datetime.fromisoformat(
                        body["created_at"]
                    )
                else:
                    self.refused.append(f"{response.status_code} {response.text[:200]}")
            next_at = max(next_at + self._interval, loop.time())
            await asyncio.sleep(next_at - loop.time())

    def accepted_until(self, moment: datetime) -> list[uuid.UUID]:
        return [id_ for id_, created in self.accepted.items() if created <= moment]


@dataclass
class Progress:
    """The processing of one tenant's campaigns, as the job log shows it."""

    db: asyncpg.Connection
    tenant: str

    async def processed(self, campaign_ids: list[uuid.UUID]) -> int:
        """How many of ``campaign_ids`` have a ``success`` row."""
        count: int = await self.db.fetchval(
            "SELECT count(DISTINCT campaign_id) FROM campaign_job_logs"
            " WHERE status = 'success' AND campaign_id = ANY($1::uuid[])",
            campaign_ids,
        )
        return count

    async def wait_caught_up(
        self, load: CampaignLoad, *, since: datetime, timeout: float = 60.0
    ) -> None:
        """Every campaign accepted until a second ago is processed, and some of them were
        accepted more than a second after ``since``: processing goes on after ``since``."""
        lag = timedelta(seconds=1)

        async def behind() -> int | None:
            horizon = now() - lag
            if horizon < since + lag:
                return None
            due = load.accepted_until(horizon)
            return len(due) - await self.processed(due)

        await eventually(
            behind,
            until=lambda left: left == 0,
            timeout=timeout,
            interval=0.25,
            what="processing caught up",
        )

    async def wait_resumed(
        self, load: CampaignLoad, *, since: datetime, count: int, timeout: float = 60.0
    ) -> None:
        """``count`` campaigns accepted after ``since`` are processed: processing goes on."""

        async def processed_since() -> int:
            fresh = [id_ for id_, created in load.accepted.items() if created > since]
            return await self.processed(fresh)

        await eventually(
            processed_since,
            until=lambda n: n >= count,
            timeout=timeout,
            interval=0.25,
            what=f"{count} campaigns processed since {since:%H:%M:%S.%f}",
        )

    async def stall(self, start: datetime, end: datetime) -> tuple[float, float]:
        """From the success rows written until ``end``: the longest time after ``start`` that no
        campaign was processed (:func:`longest_gap`), and the longest any campaign created
        between ``start`` and ``end`` waited for its success row, in seconds."""
        times = [
            row["processed_at"]
            for row in await self.db.fetch(
                "SELECT DISTINCT processed_at FROM campaign_job_logs"
                " WHERE tenant_id = $1 AND status = 'success' AND processed_at <= $2"
                " ORDER BY processed_at",
                self.tenant,
                end,
            )
        ]
        waited: float = await self.db.fetchval(
            "SELECT coalesce(max(extract(epoch FROM l.processed_at - c.created_at)), 0)"
            " FROM campaigns c JOIN campaign_job_logs l ON l.campaign_id = c.id"
            " WHERE c.tenant_id = $1 AND l.status = 'success'"
            " AND c.created_at BETWEEN $2 AND $3",
            self.tenant,
            start,
            end,
        )
        return longest_gap(times, start, end), float(waited)

    async def successes_per_campaign(self) -> dict[uuid.UUID, int]:
        rows = await self.db.fetch(
            "SELECT c.id, count(l.id) FILTER (WHERE l.status = 'success') AS successes"
            " FROM campaigns c LEFT JOIN campaign_job_logs l ON l.campaign_id = c.id"
            " WHERE c.tenant_id = $1 GROUP BY c.id",
            self.tenant,
        )
        return {row["id"]: row["successes"] for row in rows}

    async def statuses(self) -> set[str]:
        rows = await self.db.fetch(
            "SELECT DISTINCT status FROM campaign_job_logs WHERE tenant_id = $1", self.tenant
        )
        return {row["status"] for row in rows}

    async def outbox_rows(self) -> int:
        count: int = await self.db.fetchval(
            "SELECT count(*) FROM outbox WHERE tenant_id = $1", self.tenant
        )
        return count


def longest_gap(times: list[datetime], start: datetime, end: datetime) -> float:
    """The longest pause, in seconds, between consecutive ``times`` (sorted) from the last one
    at or before ``start`` (or ``start``) up to ``end``; ``end - start`` when none follows."""
    before = [t for t in times if t <= start]
    points = [before[-1] if before else start, *(t for t in times if start < t <= end)]
    return max(
        ((b - a).total_seconds() for a, b in itertools.pairwise(points)),
        default=(end - points[0]).total_seconds(),
    )
