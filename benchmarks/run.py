"""The benchmark suite: ./scripts/benchmark [--only host,drain,latency,http,tracing,database]

Prints each measurement as a table and writes them all as JSON under benchmark-results/.
Every figure that has a target is a ratio against a limit measured in the same run (a bare
loop, a bare endpoint), so the noise of the machine cancels out. Every run starts by measuring
what one round trip between two processes costs on this machine (``host``).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from pathlib import Path
from typing import Any

from benchmarks import database, drain, host, http, latency
from benchmarks.harness import bench_environment, write_results
from benchmarks.report import machine, table

ALL = ("drain", "latency", "http", "tracing", "database")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        default=",".join(ALL),
        help="comma-separated, of: " + ",".join(ALL) + "; the round trips (host) always run first",
    )
    parser.add_argument("--events", type=int, default=20_000, help="events for the drain run")
    parser.add_argument(
        "--drain-rounds",
        type=int,
        default=3,
        help="rounds of the batched loop then the worker (tracing 100%%, 10%%, off), back to "
        "back, for the drain ratios",
    )
    parser.add_argument(
        "--http-rounds",
        type=int,
        default=3,
        help="rounds of POST /campaigns against its limits (the same work on bare libraries, "
        "the bare endpoint), back to back, for its ratios",
    )
    parser.add_argument(
        "--rates",
        default="50,100,150,200",
        help="comma-separated offered rates (POST /campaigns per second) for the latency runs; "
        "the target is at 150",
    )
    parser.add_argument("--seconds", type=int, default=30, help="length of each latency run")
    parser.add_argument(
        "--latency-legs",
        default="service,same_work",
        help="comma-separated fronts for the latency runs, of: " + ",".join(latency.LEGS),
    )
    parser.add_argument("--results", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    unknown = wanted - {*ALL, "host"}
    if args.drain_rounds < 1:
        parser.error("--drain-rounds: at least 1")
    if args.http_rounds < 1:
        parser.error("--http-rounds: at least 1")
    if unknown:
        parser.error(f"--only: no such measurement {', '.join(sorted(unknown))}")
    legs = tuple(args.latency_legs.split(","))
    if not legs or set(legs) - set(latency.LEGS):
        parser.error(f"--latency-legs: of {', '.join(latency.LEGS)}")
    results: dict[str, Any] = {"machine": machine(), "python": platform.python_version()}
    started = time.monotonic()
    async with bench_environment(args.results) as bench:
        # Always: what the figures below are made of, on this machine.
        results["round_trips"] = await host.run(bench)
        print(
            table("This machine: one round trip between processes", results["round_trips"]["table"])
        )
        if "drain" in wanted:
            results["drain"] = await drain.run(bench, events=args.events, rounds=args.drain_rounds)
            print(table("Worker drain rate (medians of rounds)", results["drain"]["table"]))
            print(
                table(
                    "The worker against the batched loop, round by round",
                    results["drain"]["rounds_table"],
                )
            )
        if "latency" in wanted:
            results["latency"] = await latency.run(
                bench,
                rates=[int(rate) for rate in args.rates.split(",")],
                seconds=args.seconds,
                legs=legs,
            )
            print(table("End-to-end latency", results["latency"]["table"]))
            print(table("CPU per campaign (latency runs)", results["latency"]["cpu_table"]))
        if "http" in wanted:
            results["http"] = await http.run(bench, rounds=args.http_rounds)
            print(table("HTTP", results["http"]["table"]))
            print(table("CPU per request (HTTP runs)", results["http"]["cpu_table"]))
            post_rounds = results["http"]["post_rounds"]
            print(
                table(
                    "POST /campaigns against its limits, round by round (medians: vs the same "
                    f"work, both traced, {post_rounds['post_vs_same_work']:.2f}, target "
                    f"{post_rounds['target']}; vs bare {post_rounds['post_vs_bare']:.2f}; the "
                    f"same work vs bare {post_rounds['same_work_vs_bare']:.2f})",
                    post_rounds["table"],
                )
            )
        if "tracing" in wanted:
            results["tracing"] = await drain.tracing_cost(bench, events=min(args.events, 10_000))
            print(table("Cost of tracing (worker drain)", results["tracing"]["table"]))
        if "database" in wanted:
            results["database"] = await database.run(bench)
            print(table("A campaign written, by database layer", results["database"]["table"]))
    memory = _memory_rows(results)
    if memory:
        print(table("Memory (resident set size)", memory))
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    path = write_results(args.results, results)
    print(f"results written to {path}")


def _memory_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    if "drain" in results:
        worker = results["drain"]["worker"]
        rows.append(
            {
                "process": "worker (tracing 100%)",
                "when": f"after draining {worker['events']:,} events",
                "RSS MiB": worker["rss_mib"],
            }
        )
    for name, rss in results.get("http", {}).get("rss_mib", {}).items():
        rows.append({"process": name, "when": "after the HTTP runs", "RSS MiB": rss})
    return rows


if __name__ == "__main__":
    asyncio.run(main())
