"""Interleaved runs of two builds: ./scripts/benchmark-ab BASE [--measure drain|post|get]

The working tree against ``BASE`` (any git revision, checked out in a temporary worktree), one
run of each in turn, ``--rounds`` times, on one database and vhost: both builds see the same
machine, so a change's effect shows even when the machine's speed drifts between runs (a single
figure on these machines moves by a tenth from one run to the next).

- ``drain`` (the default): the worker drains ``--events`` queued events; events/s, and the CPU
  the worker spent per event from its first row on.
- ``post``, ``get``: campaign_service (each build's, started afresh each run; user_service of the
  working tree issues the token) under ``wrk`` for ``--seconds``, 32 connections, on POST or
  GET /campaigns; requests/s, and the CPU the service spent per request, which moves less from
  run to run on a busy host than the rate does. The outbox is drained and the tables vacuumed
  between runs.

Tracing at 100% unless ``--env OTEL_SDK_DISABLED=true`` (or any other variable) says otherwise.
Prints each run and the means, and writes them as JSON under benchmark-results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean, median
from typing import Any

from benchmarks.harness import (
    Bench,
    CpuMeter,
    Process,
    bench_environment,
    campaign_service,
    declare_topology,
    free_port,
    processing_window,
    purge_worker_queue,
    queue_events,
    seed_campaigns,
    success_rows,
    truncate_logs,
    wait_for_rows,
    wait_http,
    write_results,
)
from benchmarks.http import metered, settle, token_for, wrk
from tests.support.processes import ROOT
from tests.support.users import new_private_key_pem

UNITS = {"drain": "events/s", "post": "requests/s", "get": "requests/s"}
SCRIPTS = {"post": "post_campaign.lua", "get": "get_campaigns.lua"}


async def _drain(
    bench: Bench, name: str, root: Path, env: dict[str, str], events: int
) -> tuple[float, float]:
    """One worker of the build at ``root`` draining ``events`` queued events: events/s, and µs
    of the worker's CPU per event, from its first row on (its start-up is not the drain's)."""
    await truncate_logs(bench)
    await purge_worker_queue(bench)
    await queue_events(bench, await seed_campaigns(bench, events))
    worker = Process(
        name,
        [sys.executable, "-m", "worker"],
        bench.env(WORKER_METRICS_PORT=str(free_port()), **env),
        bench.logs,
        cwd=root,
    )
    await worker.start()
    try:
        await wait_for_rows(bench, 1, timeout=120)
        meter = CpuMeter({"worker": worker.pids})
        meter.start()
        before = await success_rows(bench)
        await wait_for_rows(bench, events, timeout=max(120, events / 100))
        spent, _ = meter.stop()
        seconds = await processing_window(bench)
    finally:
        await worker.stop()
    return events / seconds, 1e6 * spent["worker"] / max(events - before, 1)


async def _http(
    bench: Bench,
    name: str,
    root: Path,
    env: dict[str, str],
    script: str,
    seconds: int,
    user_url: str,
    token: str,
) -> tuple[float, float]:
    """One wrk run against a campaign_service of the build at ``root``: requests/s, and µs of
    the service's CPU per request (until its relay has published what the run wrote)."""
    port = free_port()
    service = campaign_service(bench, name, port, user_url, cwd=root, **env)
    await service.start()
    try:
        await wait_http(f"http://127.0.0.1:{port}/ready")
        result = await metered(
            bench,
            service,
            wrk(f"http://127.0.0.1:{port}/campaigns", script, seconds=seconds, token=token),
        )
        if result["non_2xx"] or result["socket_errors"]:
            raise RuntimeError(f"{name}: {result}")
        await settle(bench)
    finally:
        await service.stop()
    return result["requests_per_second"], result["cpu_us_per_request"]["app"]


async def compare(
    base: Path, base_name: str, rounds: int, measure: str, size: int, env: dict[str, str]
) -> dict[str, Any]:
    results_dir = ROOT / "benchmark-results"
    builds = {base_name: base, "working tree": ROOT}
    rates: dict[str, list[float]] = {name: [] for name in builds}
    cpu: dict[str, list[float]] = {name: [] for name in builds}  # µs per event or request
    unit = UNITS[measure]
    per = "an event" if measure == "drain" else "a request"
    async with bench_environment(results_dir) as bench, contextlib.AsyncExitStack() as stack:
        await declare_topology(bench)
        user_url = token = ""  # the HTTP runs' user_service, and the token it issued
        if measure != "drain":
            user_port = free_port()
            user = Process(
                "ab-user_service",
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "user_service.main:app",
                    "--port",
                    str(user_port),
                ],
                bench.env(JWT_PRIVATE_KEY=new_private_key_pem()),
                bench.logs,
            )
            await user.start()
            stack.push_async_callback(user.stop)
            user_url = f"http://127.0.0.1:{user_port}"
            await wait_http(f"{user_url}/health")
            token = await token_for(user_url)
        for round_ in range(1, rounds + 1):
            for name, root in builds.items():
                run_name = f"ab-{measure}-{len(rates[name])}"
                if measure == "drain":
                    rate, per_item = await _drain(bench, run_name, root, env, size)
                else:
                    rate, per_item = await _http(
                        bench, run_name, root, env, SCRIPTS[measure], size, user_url, token
                    )
                cpu[name].append(per_item)
                rates[name].append(rate)
                spent = f"{cpu[name][-1]:,.0f} µs CPU {per}"
                print(f"round {round_}: {name}: {rate:,.0f} {unit}, {spent}", flush=True)
    means = {name: mean(values) for name, values in rates.items()}
    print()
    for name, values in rates.items():
        listed = ", ".join(f"{value:,.0f}" for value in values)
        print(f"{name:>24}: mean {means[name]:,.0f} {unit} ({listed})")
    change = means["working tree"] / means[base_name] - 1
    print(f"{'change':>24}: {change:+.1%}")
    medians = {name: median(values) for name, values in cpu.items()}
    for name, values in cpu.items():
        listed = ", ".join(f"{value:,.0f}" for value in values)
        print(f"{name:>24}: median {medians[name]:,.0f} µs CPU {per} ({listed})")
    cpu_change = medians["working tree"] / medians[base_name] - 1
    print(f"{'change':>24}: {cpu_change:+.1%} CPU {per}")
    results = {
        "ab": {
            "base": base_name,
            "measure": measure,
            "size": size,
            "env": env,
            "rates": rates,
            "cpu_us_per_item": cpu,  # per event (drain) or per request (post, get)
        }
    }
    path = write_results(results_dir, results)
    print(f"results written to {path}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("base", help="the git revision to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", choices=sorted(UNITS), default="drain")
    parser.add_argument("--events", type=int, default=20_000, help="events a drain takes")
    parser.add_argument("--seconds", type=int, default=10, help="length of a wrk run")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for both builds")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    worktree = Path(tempfile.mkdtemp(prefix="ab-base-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.base],
        check=True,
    )
    try:
        size = args.events if args.measure == "drain" else args.seconds
        asyncio.run(compare(worktree, args.base, args.rounds, args.measure, size, env))
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False
        )
        shutil.rmtree(worktree, ignore_errors=True)


if __name__ == "__main__":
    main()
