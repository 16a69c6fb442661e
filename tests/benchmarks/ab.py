"""Interleaved worker drains of two builds: ./scripts/benchmark-ab BASE [--rounds N] [--events N]

The working tree against ``BASE`` (any git revision, checked out in a temporary worktree), one
drain of each in turn, ``--rounds`` times, on one database and vhost: both builds see the same
machine, so a change's effect shows even when the machine's speed drifts between runs (a single
figure on these machines moves by a tenth from one run to the next). Tracing at 100% unless
``--env OTEL_SDK_DISABLED=true`` (or any other variable) says otherwise. Prints each drain and
the means, and writes them as JSON under benchmark-results/.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean
from typing import Any

from tests.benchmarks.harness import (
    Bench,
    Process,
    bench_environment,
    declare_topology,
    free_port,
    processing_window,
    purge_worker_queue,
    queue_events,
    seed_campaigns,
    truncate_logs,
    wait_for_rows,
    write_results,
)
from tests.support.processes import ROOT


async def _drain(bench: Bench, name: str, root: Path, env: dict[str, str], events: int) -> float:
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
        await wait_for_rows(bench, events, timeout=max(120, events / 100))
        seconds = await processing_window(bench)
    finally:
        await worker.stop()
    return events / seconds


async def compare(
    base: Path, base_name: str, rounds: int, events: int, env: dict[str, str]
) -> dict[str, Any]:
    results_dir = ROOT / "benchmark-results"
    builds = {base_name: base, "working tree": ROOT}
    rates: dict[str, list[float]] = {name: [] for name in builds}
    async with bench_environment(results_dir) as bench:
        await declare_topology(bench)
        for round_ in range(1, rounds + 1):
            for name, root in builds.items():
                rate = await _drain(bench, f"ab-{len(rates[name])}", root, env, events)
                rates[name].append(rate)
                print(f"round {round_}: {name}: {rate:,.0f} events/s", flush=True)
    means = {name: mean(values) for name, values in rates.items()}
    print()
    for name, values in rates.items():
        listed = ", ".join(f"{value:,.0f}" for value in values)
        print(f"{name:>24}: mean {means[name]:,.0f} events/s ({listed})")
    change = means["working tree"] / means[base_name] - 1
    print(f"{'change':>24}: {change:+.1%}")
    results = {"ab": {"base": base_name, "events": events, "env": env, "rates": rates}}
    path = write_results(results_dir, results)
    print(f"results written to {path}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("base", help="the git revision to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for both builds")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    worktree = Path(tempfile.mkdtemp(prefix="ab-base-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.base],
        check=True,
    )
    try:
        asyncio.run(compare(worktree, args.base, args.rounds, args.events, env))
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False
        )
        shutil.rmtree(worktree, ignore_errors=True)


if __name__ == "__main__":
    main()
