"""End-to-end latency: campaigns created at fixed offered rates through the HTTP API, timed from
the moment each POST was due to the worker's success row (its processed_at), and to its 201 (so
that a slow service and a slow pipeline behind it can be told apart).

Open loop: requests are due on a fixed schedule whatever the answers do, and a request that
waits for a free connection counts its wait (no coordinated omission). The load generator is a
small HTTP/1.1 client on raw keep-alive connections: a general-purpose client spends more CPU
per request than the service under test, and on a shared machine that would be measured too.

Each run starts with a few seconds of campaigns at its first rate, processed and not measured
(``WARM_UP_SECONDS``): the figures are the running platform's, not its startup's.

Legs: the same runs with another front taking the POSTs, the worker the same. ``service`` is
campaign_service (the target's leg); ``same_work`` is the same work on bare libraries
(``benchmarks/same_work_app.py``: it publishes each event itself after its commit, from
memory), which tells what this machine allows whatever the service's libraries cost. A leg
named ``..._untraced`` runs the front and the worker with ``OTEL_SDK_DISABLED=true``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from benchmarks.harness import (
    Bench,
    CpuMeter,
    Process,
    campaign_service,
    free_port,
    pids_named,
    python,
    user_service,
    wait_http,
)
from benchmarks.http import same_work_app, token_for

CONNECTIONS = 64
# Before the measured rates, campaigns offered (at the first rate) and processed unmeasured: a
# service that has just started opens its pools' connections and prepares its statements on
# first use, and the database and the broker warm their caches: without it, the first rate of
# a run measured that too.
WARM_UP_SECONDS = 5
# The target: p99 from due to row under this at this offered rate, tracing 100%, nothing lost.
TARGET_RATE = 150
TARGET_P99_MS = 100


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Offered:
    """What one rate produced: when each created campaign was due, and what went wrong."""

    due: dict[uuid.UUID, float] = field(default_factory=dict)
    answered: dict[uuid.UUID, float] = field(default_factory=dict)  # when its 201 arrived
    failures: list[str] = field(default_factory=list)
    unsent: int = 0


class RawClient:
    """POSTs JSON over one keep-alive HTTP/1.1 connection; reconnects when the server closes."""

    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._token = token
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Authorization: Bearer {self._token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        self._writer.write(head + payload)
        try:
            raw_head = await self._reader.readuntil(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            answer = await self._reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, answer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def offer(url: str, token: str, rate: int, seconds: int) -> Offered:
    """Make ``rate * seconds`` POST /campaigns due at ``rate`` per second, on CONNECTIONS
    connections; stop waiting for stragglers ``seconds + 30`` seconds after the last one was
    due (those count as unsent)."""
    result = Offered()
    due_times: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

    async def connection() -> None:
        client = RawClient(url, token)
        try:
            while True:
                n, due = await due_times.get()
                try:
                    status, answer = await client.post("/campaigns", {"name": f"latency {n}"})
                except (OSError, asyncio.IncompleteReadError) as exc:
                    result.failures.append(repr(exc))
                    continue
                finally:
                    due_times.task_done()
                if status != 201:
                    result.failures.append(str(status))
                    continue
                campaign = uuid.UUID(json.loads(answer)["id"])
                result.due[campaign] = due
                result.answered[campaign] = time.time()
        finally:
            await client.close()

    workers = [asyncio.create_task(connection()) for _ in range(CONNECTIONS)]
    begin_wall, begin = time.time(), time.monotonic()
    for n in range(rate * seconds):
        delay = begin + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        due_times.put_nowait((n, begin_wall + n / rate))
    try:
        await asyncio.wait_for(due_times.join(), timeout=seconds + 30)
    except TimeoutError:
        result.unsent = due_times.qsize()
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return result


LEGS = ("service", "same_work", "service_untraced", "same_work_untraced")


def _front(bench: Bench, leg: str, port: int, user_url: str, env: dict[str, str]) -> Process:
    if leg.startswith("same_work"):
        return same_work_app(bench, port, user_url, **env)
    process = campaign_service(bench, f"campaign_service-latency-{leg}", port, user_url)
    process.env.update(env)
    return process


async def run(
    bench: Bench, rates: list[int], seconds: int, legs: tuple[str, ...] = ("service",)
) -> dict[str, Any]:
    """Every leg at every rate, one leg after another (each on its own processes)."""
    runs = [run for leg in legs for run in await _leg(bench, leg, rates, seconds)]
    target = next(
        (run for run in runs if run["leg"] == "service" and run["offered_rate"] == TARGET_RATE),
        None,
    )
    return {
        "connections": CONNECTIONS,
        "warm_up_seconds": WARM_UP_SECONDS,
        "target_rate": TARGET_RATE,
        "target_p99_ms": TARGET_P99_MS,
        # None when no run of the service was at the target's rate.
        "met": None
        if target is None
        else bool(
            target["p99_ms"] < TARGET_P99_MS
            and target["lost"] == 0
            and target["failed_requests"] + target["unsent"] == 0
        ),
        "runs": runs,
        "table": [
            {
                "front": run["leg"],
                "rate/s": run["offered_rate"],
                "seconds": seconds,
                "created": run["created"],
                "failed": run["failed_requests"] + run["unsent"],
                "lost": run["lost"],
                "p50 ms": round(run["p50_ms"], 1),
                "p95 ms": round(run["p95_ms"], 1),
                "p99 ms": round(run["p99_ms"], 1),
                "max ms": round(run["max_ms"], 1),
                "201 p50 ms": round(run["answer_p50_ms"], 1),
                "201 p99 ms": round(run["answer_p99_ms"], 1),
            }
            for run in runs
        ],
        "cpu_table": [
            {
                "front": run["leg"],
                "rate/s": run["offered_rate"],
                **{f"{name} ms": ms for name, ms in run["cpu_ms_per_campaign"].items()},
                "all listed ms": round(sum(run["cpu_ms_per_campaign"].values()), 2),
                "machine busy %": run["machine_busy_percent"],
            }
            for run in runs
        ],
    }


async def _leg(bench: Bench, leg: str, rates: list[int], seconds: int) -> list[dict[str, Any]]:
    env = {"OTEL_SDK_DISABLED": "true"} if leg.endswith("_untraced") else {}
    ports = {name: free_port() for name in ("user", "campaigns", "worker")}
    user_url = f"http://127.0.0.1:{ports['user']}"
    campaigns_url = f"http://127.0.0.1:{ports['campaigns']}"
    user = user_service(bench, f"user_service-latency-{leg}", ports["user"])
    service = _front(bench, leg, ports["campaigns"], user_url, env)
    worker = Process(
        f"worker-latency-{leg}",
        python("-m", "worker"),
        bench.env(WORKER_METRICS_PORT=str(ports["worker"]), **env),
        bench.logs,
    )
    started: list[Process] = []
    runs = []
    try:
        # The front reads the token keys from user_service as it starts.
        for process, up in ((user, f"{user_url}/health"), (service, f"{campaigns_url}/health")):
            started.append(process)
            await process.start()
            await wait_http(up)
        started.append(worker)
        await worker.start()
        await wait_http(f"http://127.0.0.1:{ports['worker']}/ready")
        token = await token_for(user_url)
        warm_up = await offer(campaigns_url, token, rates[0], WARM_UP_SECONDS)
        await _wait_processed(bench, set(warm_up.due), timeout=60)
        for rate in rates:
            # Where the machine's CPU went while the campaigns were created and processed.
            meter = CpuMeter(
                {
                    # Spans are exported by a thread of each process.
                    "front": service.pids,
                    "worker": worker.pids,
                    "postgresql": lambda: pids_named("postgres"),
                    "rabbitmq": lambda: pids_named("beam.smp"),
                    "load generator": lambda: [os.getpid()],
                }
            )
            meter.start()
            offered = await offer(campaigns_url, token, rate, seconds)
            processed = await _wait_processed(bench, set(offered.due), timeout=60)
            spent, busy = meter.stop()
            run = {"leg": leg, **_summary(rate, seconds, offered, processed)}
            created = max(run["created"], 1)
            run["cpu_ms_per_campaign"] = {
                name: round(1000 * cpu / created, 2) for name, cpu in spent.items()
            }
            run["machine_busy_percent"] = round(100 * busy, 1)
            runs.append(run)
    finally:
        for process in reversed(started):
            await process.stop()
    return runs


def _summary(
    rate: int, seconds: int, offered: Offered, processed: dict[uuid.UUID, datetime]
) -> dict[str, Any]:
    latencies = [
        (processed[campaign].timestamp() - due) * 1000
        for campaign, due in offered.due.items()
        if campaign in processed
    ] or [float("nan")]
    # Where the time went: until the 201 (the request waiting for the service and served), and
    # from the 201 to the row (the relay, the broker and the worker).
    answers = [
        (offered.answered[campaign] - due) * 1000 for campaign, due in offered.due.items()
    ] or [float("nan")]
    return {
        "offered_rate": rate,
        "seconds": seconds,
        "created": len(offered.due),
        "failed_requests": len(offered.failures),
        "failure_samples": sorted(set(offered.failures))[:5],
        "unsent": offered.unsent,
        "lost": len(offered.due) - len(processed),
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "mean_ms": statistics.mean(latencies),
        "answer_p50_ms": percentile(answers, 0.50),
        "answer_p99_ms": percentile(answers, 0.99),
    }


async def _wait_processed(
    bench: Bench, campaigns: set[uuid.UUID], timeout: float
) -> dict[uuid.UUID, datetime]:
    deadline = time.monotonic() + timeout
    connection = await asyncpg.connect(bench.dsn)
    try:
        while True:
            rows = await connection.fetch(
                "SELECT campaign_id, processed_at FROM campaign_job_logs "
                "WHERE status = 'success' AND campaign_id = ANY($1::uuid[])",
                list(campaigns),
            )
            processed = {row["campaign_id"]: row["processed_at"] for row in rows}
            if len(processed) == len(campaigns) or time.monotonic() > deadline:
                return processed
            await asyncio.sleep(0.5)
    finally:
        await connection.close()
