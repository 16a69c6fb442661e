"""What the benchmarks share: a database and a vhost of their own, seeded campaigns and queued
events, processes started as users start them, and an OTLP sink that swallows spans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.events import CampaignCreated
from shared.messaging import create_broker, declare_core, declare_retry_ladder
from shared.migrate import migrate
from tests.support.databases import create_database, drop_database
from tests.support.processes import ROOT, free_port
from tests.support.rabbit import RabbitAdmin, new_vhost_name, vhost_url
from tests.support.servers import serve
from tests.support.users import new_private_key_pem

ADMIN_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TENANT = "bench"


@dataclass
class Bench:
    database_url: str
    amqp_url: str
    otlp_endpoint: str
    logs: Path
    spans_received: list[int] = field(default_factory=lambda: [0])

    @property
    def dsn(self) -> str:
        return self.database_url.replace("+asyncpg", "")

    def env(self, **extra: str) -> dict[str, str]:
        own = ("JWT_", "DATABASE_", "RABBITMQ_", "WORKER_", "OUTBOX_", "OTEL_", "GATEWAY_")
        base = {k: v for k, v in os.environ.items() if not k.startswith(own)}
        return {
            **base,
            "ENVIRONMENT": "test",
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": self.database_url,
            "RABBITMQ_URL": self.amqp_url,
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_TRACES_SAMPLER": "always_on",
            **extra,
        }


@asynccontextmanager
async def bench_environment(results_dir: Path) -> AsyncIterator[Bench]:
    run = uuid.uuid4().hex[:8]
    database = f"campaigns_bench_{run}"
    vhost = new_vhost_name("bench")
    admin = RabbitAdmin()
    database_url = await create_database(ADMIN_DATABASE_URL, database)
    await admin.create_vhost(vhost)
    logs = results_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    received = [0]

    async def swallow(request: Request) -> Response:
        received[0] += 1
        await request.body()
        return Response(b"", media_type="application/x-protobuf")

    sink = Starlette(routes=[Route("/v1/traces", swallow, methods=["POST"])])
    try:
        await migrate(database_url)
        async with serve(sink, lifespan="off") as otlp:
            yield Bench(database_url, vhost_url(vhost), otlp, logs, received)
    finally:
        await admin.delete_vhost(vhost)
        await admin.close()
        await drop_database(ADMIN_DATABASE_URL, database)


async def seed_campaigns(bench: Bench, count: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    connection = await asyncpg.connect(bench.dsn)
    try:
        await connection.copy_records_to_table(
            "campaigns",
            records=[(i, TENANT, f"campaign {n}", None) for n, i in enumerate(ids)],
            columns=["id", "tenant_id", "name", "description"],
        )
    finally:
        await connection.close()
    return ids


async def declare_topology(bench: Bench) -> None:
    broker = create_broker(bench.amqp_url, app_id="benchmark")
    await broker.connect()
    await declare_core(broker)
    await declare_retry_ladder(broker, (1.0, 5.0, 30.0))
    await broker.stop()


async def purge_worker_queue(bench: Bench) -> None:
    """Empty the worker's queue: a bare loop stops at its count and gives back what it had
    prefetched, which must not count for the next consumer."""
    connection = await aio_pika.connect(bench.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("worker.campaign.created", passive=True)
        await queue.purge()


async def queue_events(bench: Bench, campaigns: list[uuid.UUID], *, sampled_every: int = 1) -> None:
    """One campaign.created per campaign, queued while nothing consumes, each with a W3C
    traceparent of its own as the outbox relay sends them (a message without one makes the
    consumer start a trace of its own, a span more than in production). One trace in
    ``sampled_every`` is marked sampled, as a root sampler at that ratio would have marked it."""
    connection = await aio_pika.connect(bench.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("campaigns")
        for start in range(0, len(campaigns), 1000):
            chunk = campaigns[start : start + 1000]
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            CampaignCreated(tenant_id=TENANT, campaign_id=campaign, name="bench")
                            .model_dump_json()
                            .encode(),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            headers={
                                "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-"
                                + ("01" if (start + n) % sampled_every == 0 else "00")
                            },
                        ),
                        routing_key="campaign.created",
                    )
                    for n, campaign in enumerate(chunk)
                )
            )


async def success_rows(bench: Bench) -> int:
    connection = await asyncpg.connect(bench.dsn)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM campaign_job_logs WHERE status = 'success'"
        )
        return count
    finally:
        await connection.close()


async def processing_window(bench: Bench) -> float:
    """Seconds from the first row to the last (process start-up is not counted)."""
    connection = await asyncpg.connect(bench.dsn)
    try:
        first, last = await connection.fetchrow(
            "SELECT min(processed_at), max(processed_at) FROM campaign_job_logs"
        )
    finally:
        await connection.close()
    return float((last - first).total_seconds())


async def truncate_logs(bench: Bench) -> None:
    connection = await asyncpg.connect(bench.dsn)
    try:
        await connection.execute("TRUNCATE campaign_job_logs")
    finally:
        await connection.close()


class Process:
    def __init__(
        self, name: str, args: list[str], env: dict[str, str], logs: Path, *, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.cwd = cwd  # the build it runs: another checkout's, to compare two
        self.args = args
        self.env = env
        self.log_path = logs / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=log
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pids(self) -> list[int]:
        """The process and the processes it started (if any)."""
        return [self.pid, *_descendants(self.pid)]

    def rss_mib(self) -> float | None:
        """Resident set size of the process and the processes it started (if any), or None
        once it has exited (the baselines stop at their count)."""
        sizes = [_rss_mib(pid) for pid in self.pids()]
        if sizes[0] is None:
            return None
        return sum(size or 0 for size in sizes)

    async def wait(self, timeout: float) -> None:
        """Until the process exits by itself; TimeoutError after ``timeout`` seconds."""
        assert self.process is not None
        returncode = await asyncio.wait_for(self.process.wait(), timeout)
        if returncode != 0:
            raise RuntimeError(f"{self.name} exited with {returncode}: see {self.log_path}")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _descendants(pid: int) -> list[int]:
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _process_seconds(pid: int) -> float:
    """CPU seconds of a process and of its children that have exited (PostgreSQL's backends
    are the postmaster's); 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS


def pids_named(command: str) -> list[int]:
    """Every process whose command name is ``command`` (``postgres``, ``beam.smp``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids


def _machine_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every CPU since boot, from /proc/stat: user, nice, system,
    idle, iowait, irq, softirq and steal (guest time is counted in user already)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class CpuMeter:
    """CPU time per process group over a run: where a machine's cores went, and how busy the
    whole machine was (every process on it, not only the measured ones)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        """``groups``: each group's processes, looked up at the start and again at the end (a
        PostgreSQL backend opened during the run counts from its start; one that ended counts
        in its postmaster's children's time)."""
        self._groups = groups
        self._start: dict[str, float] = {}
        self._machine = (0, 0)

    def _read(self) -> dict[str, float]:
        return {
            name: sum(_process_seconds(pid) for pid in pids())
            for name, pids in self._groups.items()
        }

    def start(self) -> None:
        self._start = self._read()
        self._machine = _machine_ticks()

    def stop(self) -> tuple[dict[str, float], float]:
        """CPU seconds of each group since :meth:`start`, and the machine's busy share (0-1)."""
        end = self._read()
        busy, total = _machine_ticks()
        spent = {name: end[name] - self._start[name] for name in end}
        share = (busy - self._machine[0]) / max(total - self._machine[1], 1)
        return spent, share


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def user_service(bench: Bench, name: str, port: int) -> Process:
    """user_service as its container runs it, with a signing key of its own."""
    return Process(
        name,
        python("-m", "uvicorn", "user_service.main:app", "--port", str(port)),
        bench.env(JWT_PRIVATE_KEY=new_private_key_pem()),
        bench.logs,
    )


def campaign_service(
    bench: Bench, name: str, port: int, user_url: str, *, cwd: Path = ROOT, **env: str
) -> Process:
    """campaign_service as its container runs it, verifying tokens with ``user_url``'s keys
    (of the build at ``cwd``)."""
    return Process(
        name,
        python("-m", "uvicorn", "campaign_service.main:app", "--port", str(port)),
        bench.env(JWT_JWKS_URL=f"{user_url}/.well-known/jwks.json", **env),
        bench.logs,
        cwd=cwd,
    )


def uvicorn_args(app: str, port: int, *, access_log: bool = False) -> list[str]:
    args = ["-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    return python(*args) if access_log else python(*args, "--no-access-log")


async def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready")
            await asyncio.sleep(0.1)


async def wait_for_rows(bench: Bench, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (seen := await success_rows(bench)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {seen} of {count} rows within {timeout}s")
        await asyncio.sleep(0.25)


def write_results(results_dir: Path, results: dict[str, Any]) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = results_dir / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


__all__ = ["free_port"]
