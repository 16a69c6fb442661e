"""HTTP throughput and latency with wrk, each against its limit in the same run:
- POST /campaigns vs the same work on bare libraries, both with the same stock instrumentation
  (the target), in rounds; and POST and GET /campaigns vs a bare FastAPI app doing the same
  inserts and query;
- the same requests through the gateway vs straight to the service (the gateway's overhead);
- POST /login at full load while /health is timed alongside (is the event loop ever blocked?);
- the CPU each POST and GET costs the machine, by process: the app's, PostgreSQL's, RabbitMQ's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from benchmarks.harness import (
    Bench,
    CpuMeter,
    Process,
    campaign_service,
    declare_topology,
    free_port,
    pids_named,
    purge_worker_queue,
    python,
    user_service,
    uvicorn_args,
    wait_http,
)
from tests.support.polling import eventually
from tests.support.users import PASSWORD

LUA = Path(__file__).parent / "lua"
SECONDS = int(os.environ.get("BENCH_HTTP_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_HTTP_CONNECTIONS", "32"))


def parse_wrk(output: str) -> dict[str, Any]:
    def ms(text: str) -> float:
        number, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    result: dict[str, Any] = {
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
    }
    for percentile in ("50", "90", "99"):
        match = re.search(rf"^\s+{percentile}%\s+(\S+)", output, re.M)
        result[f"p{percentile}_ms"] = ms(match.group(1)) if match else None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(errors.group(1)) if errors else 0
    socket_errors = re.search(r"Socket errors: (.+)", output)
    result["socket_errors"] = socket_errors.group(1) if socket_errors else ""
    return result


async def wrk(
    url: str,
    script: str | None,
    *,
    connections: int = CONNECTIONS,
    seconds: int = SECONDS,
    token: str = "",
) -> dict[str, Any]:
    wrk_path = shutil.which("wrk")
    assert wrk_path, "wrk is missing: scripts/benchmark installs Debian's wrk"
    args = [wrk_path, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        args += ["-s", str(LUA / script)]
    process = await asyncio.create_subprocess_exec(
        *args,
        url,
        env={**os.environ, "TOKEN": token},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return parse_wrk(output.decode())


async def token_for(user_url: str) -> str:
    credentials = {"tenant_id": "bench", "email": "bench@example.com", "password": PASSWORD}
    async with httpx.AsyncClient(base_url=user_url) as client:
        await client.post("/register", json=credentials)
        response = await client.post("/login", json=credentials)
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


async def outbox_empty(bench: Bench, *, drop_outbox: bool = False) -> None:
    """Until the outbox is empty: the bare app's rows dropped, or campaign_service's relay
    waited for."""
    connection = await asyncpg.connect(bench.dsn)

    async def pending() -> int:
        if drop_outbox:  # again on every poll: requests wrk left in flight may still commit
            await connection.execute("DELETE FROM outbox")
        count: int = await connection.fetchval("SELECT count(*) FROM outbox")
        return count

    try:
        await eventually(
            pending,
            until=lambda pending: pending == 0,
            timeout=120,
            interval=0.5,
            what="the outbox relay done",
        )
    finally:
        await connection.close()


async def settle(bench: Bench, *, drop_outbox: bool = False) -> None:
    """Between measurements: no work left over from the last one competes with the next. The
    outbox is emptied, the events published so far are dropped (a queue tens of thousands long
    makes each publish of the next run cost the broker more), and the tables the inserts grew
    are vacuumed and analysed now rather than by an autovacuum in the middle of the next run."""
    await outbox_empty(bench, drop_outbox=drop_outbox)
    await purge_worker_queue(bench)
    connection = await asyncpg.connect(bench.dsn)
    try:
        await connection.execute("VACUUM ANALYZE campaigns, outbox")
    finally:
        await connection.close()


CPU_GROUPS = ("app", "postgresql", "rabbitmq", "load generator")


async def metered(
    bench: Bench, app: Process, run: Awaitable[dict[str, Any]], *, drop_outbox: bool = False
) -> dict[str, Any]:
    """A wrk run's result, with the CPU its requests cost each process group: from its start
    until the outbox is empty again, so a campaign's publish and its row's delete count with
    the request that wrote it (the bare app's rows are deleted by the benchmark instead)."""
    meter = CpuMeter(
        {
            "app": app.pids,  # spans are exported by a thread of the app's process
            "postgresql": lambda: pids_named("postgres"),
            "rabbitmq": lambda: pids_named("beam.smp"),
            "load generator": lambda: [os.getpid()],  # wrk is its child
        }
    )
    meter.start()
    result = await run
    await outbox_empty(bench, drop_outbox=drop_outbox)
    spent, _ = meter.stop()
    result["cpu_us_per_request"] = {
        name: seconds / result["requests"] * 1e6 for name, seconds in spent.items()
    }
    return result


def same_work_app(bench: Bench, port: int, user_url: str, **env: str) -> Process:
    """The limit of the POST /campaigns target: the service's work for a campaign on bare
    libraries (benchmarks/same_work_app.py), with the service's stock instrumentation (traced at
    100% into the OTLP sink, as the service here; ``OTEL_SDK_DISABLED="true"`` for untraced),
    and uvicorn's access line as the service."""
    untraced = env.get("OTEL_SDK_DISABLED") == "true"
    return Process(
        "same_work_app_untraced" if untraced else "same_work_app",
        uvicorn_args("benchmarks.same_work_app:app", port, access_log=True),
        bench.env(JWT_JWKS_URL=f"{user_url}/.well-known/jwks.json", **env),
        bench.logs,
    )


async def post_run(
    bench: Bench, app: Process, port: int, up: str, *, token: str = "", drop_outbox: bool = False
) -> dict[str, Any]:
    """Start ``app`` on ``port``, wait for ``up`` to answer, measure POST /campaigns, stop it."""
    url = f"http://127.0.0.1:{port}"
    await app.start()
    try:
        await wait_http(f"{url}{up}")
        run = wrk(f"{url}/campaigns", "post_campaign.lua", token=token)
        return await metered(bench, app, run, drop_outbox=drop_outbox)
    finally:
        await app.stop()


async def same_work_post(bench: Bench, user_url: str, token: str, **env: str) -> dict[str, Any]:
    port = free_port()
    app = same_work_app(bench, port, user_url, **env)
    return await post_run(bench, app, port, "/health", token=token)


def bare_app(bench: Bench, key: str, port: int, *, traced: bool) -> Process:
    """The limit (benchmarks/bare_app.py), untraced or traced as the services are."""
    return Process(
        f"{key}_app",
        uvicorn_args("benchmarks.bare_app:app", port),
        bench.env(BARE_TRACING="true" if traced else "false"),
        bench.logs,
    )


# The target: campaign_service's POST /campaigns over the same work on bare libraries, both
# traced with the same stock instrumentation, the median of rounds.
TARGET_POST_VS_SAME_WORK = 0.6


async def post_rounds(bench: Bench, user_url: str, token: str, rounds: int) -> dict[str, Any]:
    """``POST /campaigns`` against its limits in ``rounds`` rounds. In each, back to back: the
    bare endpoint (untraced, for scale), the same work on bare libraries and campaign_service,
    these two with the same stock instrumentation, tracing 100% into the OTLP sink (the
    target); each process started for its run and stopped after it, as they write the same
    tables. On these hosts the speed drifts over minutes, and the main runs measure these
    minutes apart; each ratio's median over the rounds stands for them, as in the drain."""
    port = free_port()
    # Each leg: its process, the path that says it is up, and whether it needs the token. The
    # bare app's outbox rows are dropped after its run: nothing publishes them.
    legs = {
        "bare": (bare_app(bench, "bare_rounds", port, traced=False), "/health", False),
        "same_work": (same_work_app(bench, port, user_url), "/health", True),
        "service": (
            campaign_service(bench, "campaign_service_rounds", port, user_url),
            "/ready",
            True,
        ),
    }
    each: list[dict[str, dict[str, Any]]] = []
    for _ in range(rounds):
        measured = {}
        for key, (process, up, authorized) in legs.items():
            await settle(bench, drop_outbox=True)
            measured[key] = await post_run(
                bench,
                process,
                port,
                up,
                token=token if authorized else "",
                drop_outbox=key == "bare",
            )
        each.append(measured)

    def rate(leg: dict[str, Any]) -> float:
        return float(leg["requests_per_second"])

    vs_same_work = [rate(r["service"]) / rate(r["same_work"]) for r in each]
    vs_bare = [rate(r["service"]) / rate(r["bare"]) for r in each]
    same_work_vs_bare = [rate(r["same_work"]) / rate(r["bare"]) for r in each]
    return {
        "rounds": each,
        "post_vs_same_work_each_round": vs_same_work,
        "post_vs_same_work": _median(vs_same_work),
        "target": TARGET_POST_VS_SAME_WORK,
        "met": _median(vs_same_work) >= TARGET_POST_VS_SAME_WORK,
        "post_vs_bare_each_round": vs_bare,
        "post_vs_bare": _median(vs_bare),
        # How close the same work on bare libraries, traced, comes to the bare endpoint.
        "same_work_vs_bare_each_round": same_work_vs_bare,
        "same_work_vs_bare": _median(same_work_vs_bare),
        "table": [
            {
                "round": n,
                "bare endpoint (untraced) req/s": round(rate(r["bare"])),
                "same work, traced req/s": round(rate(r["same_work"])),
                "campaign_service, traced req/s": round(rate(r["service"])),
                "service vs same work": round(vs_same_work[n - 1], 2),
                "service vs bare": round(vs_bare[n - 1], 2),
                "same work vs bare": round(same_work_vs_bare[n - 1], 2),
            }
            for n, r in enumerate(each, start=1)
        ],
    }


def _median(ratios: list[float]) -> float:
    """The middle ratio (the lower middle one of an even number)."""
    return sorted(ratios)[(len(ratios) - 1) // 2]


async def run(bench: Bench, rounds: int = 3) -> dict[str, Any]:
    """Every HTTP measurement once, then the ``POST /campaigns`` target in ``rounds`` rounds."""
    results: dict[str, Any] = {}
    await declare_topology(bench)

    # The limit: the bare app alone; then the same app traced as the services are.
    for traced, key in ((False, "bare"), (True, "bare_traced")):
        bare_port = free_port()
        bare = bare_app(bench, key, bare_port, traced=traced)
        await bare.start()
        try:
            await wait_http(f"http://127.0.0.1:{bare_port}/health")
            bare_url = f"http://127.0.0.1:{bare_port}/campaigns"
            await settle(bench, drop_outbox=True)
            results[f"{key}_post"] = await metered(
                bench, bare, wrk(bare_url, "post_campaign.lua"), drop_outbox=True
            )
            await settle(bench, drop_outbox=True)
            results[f"{key}_get"] = await metered(
                bench, bare, wrk(bare_url, "get_campaigns.lua"), drop_outbox=True
            )
        finally:
            await bare.stop()
    await settle(bench, drop_outbox=True)  # rows of requests still in flight when wrk ended

    # The platform's services, as their containers run them.
    ports = {name: free_port() for name in ("user", "campaigns", "gateway")}
    user_url = f"http://127.0.0.1:{ports['user']}"
    campaigns_url = f"http://127.0.0.1:{ports['campaigns']}"
    routes = (
        f'[{{"name": "user_service", "prefix": "/api/users", "upstream": "{user_url}"}},'
        f' {{"name": "campaign_service", "prefix": "/api/campaigns",'
        f' "upstream": "{campaigns_url}/campaigns"}}]'
    )
    services = [
        user_service(bench, "user_service", ports["user"]),
        campaign_service(bench, "campaign_service", ports["campaigns"], user_url),
        Process(
            "gateway",
            python(
                "-m",
                "uvicorn",
                "gateway.main:app",
                "--port",
                str(ports["gateway"]),
                "--no-proxy-headers",
            ),
            bench.env(GATEWAY_ROUTES=routes),
            bench.logs,
        ),
    ]
    for service in services:
        await service.start()
    try:
        await wait_http(f"{user_url}/health")
        await wait_http(f"{campaigns_url}/ready")
        await wait_http(f"http://127.0.0.1:{ports['gateway']}/health")
        token = await token_for(user_url)
        gateway_url = f"http://127.0.0.1:{ports['gateway']}/api/campaigns"

        # A login storm, with /health timed on one more connection at the same time. First,
        # while the machine is quiet: after the POST runs, PostgreSQL's autovacuum and the
        # broker's queue of unconsumed events would take CPU the question is not about.
        # Twice: the first storm also opens the pool's connections, all at once (a PostgreSQL
        # backend started and the driver set up for each); the second shows the steady state.
        cold_storm, cold_health = await asyncio.gather(
            wrk(f"{user_url}/login", "login.lua", connections=16),
            wrk(f"{user_url}/health", None, connections=1),
        )
        storm, health = await asyncio.gather(
            wrk(f"{user_url}/login", "login.lua", connections=16),
            wrk(f"{user_url}/health", None, connections=1),
        )

        service = services[1]
        results["service_post"] = await metered(
            bench, service, wrk(f"{campaigns_url}/campaigns", "post_campaign.lua", token=token)
        )
        await settle(bench)
        results["service_get"] = await metered(
            bench, service, wrk(f"{campaigns_url}/campaigns", "get_campaigns.lua", token=token)
        )
        results["gateway_get"] = await wrk(gateway_url, "get_campaigns.lua", token=token)
        results["gateway_post"] = await wrk(gateway_url, "post_campaign.lua", token=token)
        await settle(bench)
        # The gateway's own cost per request, without queueing: one connection, same request.
        results["service_get_1"] = await wrk(
            f"{campaigns_url}/campaigns", "get_campaigns.lua", connections=1, token=token
        )
        results["gateway_get_1"] = await wrk(
            gateway_url, "get_campaigns.lua", connections=1, token=token
        )

        results["login_storm_cold"] = cold_storm
        results["health_during_cold_storm"] = cold_health
        results["login_storm"] = storm
        results["health_during_storm"] = health
        results["rss_mib"] = {service.name: service.rss_mib() for service in services}
    finally:
        for service in services:
            await service.stop()

    # The same work on bare libraries, traced and untraced, and the cost of tracing on the
    # request path: campaign_service again, with tracing off.
    await settle(bench)
    untraced = campaign_service(
        bench, "campaign_service_untraced", ports["campaigns"], user_url, OTEL_SDK_DISABLED="true"
    )
    user = services[0]
    await user.start()  # the token's keys, from its JWKS
    try:
        await wait_http(f"{user_url}/health")
        results["same_work_post"] = await same_work_post(bench, user_url, token)
        await settle(bench)
        results["same_work_untraced_post"] = await same_work_post(
            bench, user_url, token, OTEL_SDK_DISABLED="true"
        )
        await settle(bench)
        await untraced.start()
        try:
            await wait_http(f"{campaigns_url}/ready")
            results["untraced_post"] = await metered(
                bench,
                untraced,
                wrk(f"{campaigns_url}/campaigns", "post_campaign.lua", token=token),
            )
            await settle(bench)
            results["untraced_get"] = await metered(
                bench,
                untraced,
                wrk(f"{campaigns_url}/campaigns", "get_campaigns.lua", token=token),
            )
        finally:
            await untraced.stop()
        results["post_rounds"] = await post_rounds(bench, user_url, token, rounds)
    finally:
        await user.stop()

    def row(name: str, key: str, reference: str | None = None) -> dict[str, Any]:
        result = results[key]
        ratio = (
            result["requests_per_second"] / results[reference]["requests_per_second"]
            if reference
            else None
        )
        return {
            "measurement": name,
            "req/s": round(result["requests_per_second"]),
            "p50 ms": result["p50_ms"],
            "p99 ms": result["p99_ms"],
            "non-2xx": result["non_2xx"],
            "vs limit": round(ratio, 2) if ratio is not None else "",
        }

    results["post_vs_bare"] = (
        results["service_post"]["requests_per_second"] / results["bare_post"]["requests_per_second"]
    )
    results["post_vs_same_work"] = (
        results["service_post"]["requests_per_second"]
        / results["same_work_post"]["requests_per_second"]
    )
    results["untraced_post_vs_same_work"] = (
        results["untraced_post"]["requests_per_second"]
        / results["same_work_untraced_post"]["requests_per_second"]
    )
    results["get_vs_bare"] = (
        results["service_get"]["requests_per_second"] / results["bare_get"]["requests_per_second"]
    )
    # What tracing leaves of the service's throughput (traced over untraced).
    results["tracing_cost_post"] = (
        results["service_post"]["requests_per_second"]
        / results["untraced_post"]["requests_per_second"]
    )
    results["tracing_cost_get"] = (
        results["service_get"]["requests_per_second"]
        / results["untraced_get"]["requests_per_second"]
    )
    # The gateway's own cost per request, without queueing (one connection, same request).
    results["gateway_overhead_p50_ms"] = (
        results["gateway_get_1"]["p50_ms"] - results["service_get_1"]["p50_ms"]
    )
    results["table"] = [
        row("bare FastAPI: POST (same inserts)", "bare_post"),
        row("bare FastAPI, traced as the services: POST", "bare_traced_post", "bare_post"),
        row("campaign_service: POST /campaigns", "service_post", "bare_post"),
        row("campaign_service, tracing off: POST", "untraced_post", "bare_post"),
        row("the same work on bare libraries, traced as the service: POST", "same_work_post"),
        row(
            "campaign_service: POST, vs the same work (both traced)",
            "service_post",
            "same_work_post",
        ),
        row("the same work on bare libraries, untraced: POST", "same_work_untraced_post"),
        row(
            "campaign_service, tracing off: POST, vs the same work untraced",
            "untraced_post",
            "same_work_untraced_post",
        ),
        row("bare FastAPI: GET (same query)", "bare_get"),
        row("bare FastAPI, traced as the services: GET", "bare_traced_get", "bare_get"),
        row("campaign_service: GET /campaigns", "service_get", "bare_get"),
        row("campaign_service, tracing off: GET", "untraced_get", "bare_get"),
        row("gateway -> campaign_service: GET", "gateway_get", "service_get"),
        row("gateway -> campaign_service: POST", "gateway_post", "service_post"),
        row("campaign_service: GET, 1 connection", "service_get_1"),
        row("gateway -> campaign_service: GET, 1 connection", "gateway_get_1", "service_get_1"),
        row("POST /login (16 connections), first storm", "login_storm_cold"),
        row("GET /health during the first storm", "health_during_cold_storm"),
        row("POST /login (16 connections), second storm", "login_storm"),
        row("GET /health during the second storm", "health_during_storm"),
    ]
    results["cpu_table"] = [
        cpu_row(name, results[key], results[reference]["requests_per_second"])
        for name, key, reference in (
            ("bare FastAPI: POST", "bare_post", "bare_post"),
            ("bare FastAPI, traced: POST", "bare_traced_post", "bare_post"),
            ("campaign_service: POST /campaigns", "service_post", "bare_post"),
            ("campaign_service, tracing off: POST", "untraced_post", "bare_post"),
            ("the same work on bare libraries, traced: POST", "same_work_post", "bare_post"),
            (
                "the same work on bare libraries, untraced: POST",
                "same_work_untraced_post",
                "bare_post",
            ),
            ("bare FastAPI: GET", "bare_get", "bare_get"),
            ("bare FastAPI, traced: GET", "bare_traced_get", "bare_get"),
            ("campaign_service: GET /campaigns", "service_get", "bare_get"),
            ("campaign_service, tracing off: GET", "untraced_get", "bare_get"),
        )
    ]
    return results


def cpu_row(name: str, result: dict[str, Any], bare_rate: float) -> dict[str, Any]:
    """CPU per request by process group, and how many cores that work would take at half the
    bare endpoint's rate, all of it and the part outside the app's process: what no change to
    the app's code can take away."""
    cpu = result["cpu_us_per_request"]
    total = sum(cpu.values())
    half = bare_rate / 2 / 1e6
    return {
        "measurement": name,
        **{f"{group} µs": round(cpu[group]) for group in CPU_GROUPS},
        "all µs": round(total),
        "cores at half the bare rate": round(total * half, 2),
        "outside the app": round((total - cpu["app"]) * half, 2),
    }
