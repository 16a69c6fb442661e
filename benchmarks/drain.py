"""Worker drain rate: N events already queued, zero simulated work; events per second until N
success rows exist, for the worker and for the bare loops it is measured against."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import (
    Bench,
    Process,
    declare_topology,
    free_port,
    processing_window,
    purge_worker_queue,
    python,
    queue_events,
    seed_campaigns,
    truncate_logs,
    wait_for_rows,
)


async def _drain(
    bench: Bench,
    name: str,
    commands: list[tuple[list[str], dict[str, str]]],
    events: int,
    *,
    sampled_every: int = 1,
) -> dict[str, Any]:
    """Queue ``events``, start one process per command (competing consumers), and time the
    rows from the first to the last."""
    await truncate_logs(bench)
    await purge_worker_queue(bench)
    campaigns = await seed_campaigns(bench, events)
    await queue_events(bench, campaigns, sampled_every=sampled_every)
    processes = [
        Process(name if len(commands) == 1 else f"{name}-{n}", args, env, bench.logs)
        for n, (args, env) in enumerate(commands)
    ]
    for process in processes:
        await process.start()
    try:
        await wait_for_rows(bench, events, timeout=max(120, events / 100))
        seconds = await processing_window(bench)
        sizes = [process.rss_mib() for process in processes]
    finally:
        for process in processes:
            await process.stop()
    return {
        "events": events,
        "seconds": seconds,
        "events_per_second": events / seconds,
        "rss_mib": None if None in sizes else sum(size or 0 for size in sizes),
    }


async def worker_drain(
    bench: Bench, events: int, *, processes: int = 1, sampled_every: int = 1, **env: str
) -> dict[str, Any]:
    commands = [
        (python("-m", "worker"), bench.env(WORKER_METRICS_PORT=str(free_port()), **env))
        for _ in range(processes)
    ]
    return await _drain(bench, "worker", commands, events, sampled_every=sampled_every)


async def sampled_worker_drain(bench: Bench, events: int) -> dict[str, Any]:
    """The worker as production would run it: one trace in ten sampled at the root (the HTTP
    request), and the worker following its parent's decision."""
    return await worker_drain(
        bench,
        events,
        sampled_every=10,
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.1",
    )


async def baseline_drain(bench: Bench, mode: str, events: int) -> dict[str, Any]:
    args = ["--mode", mode, "--count", str(events)]
    command = python("-m", "benchmarks.baseline_consumer", *args)
    return await _drain(bench, f"baseline-{mode}", [(command, bench.env())], events)


async def run(bench: Bench, events: int, rounds: int = 3) -> dict[str, Any]:
    """The worker against the batched loop in ``rounds`` rounds, the two back to back in each,
    so that each ratio compares them over the same minute: on a shared host everything's speed
    drifts by more than a tenth from one minute to the next. The target's figure is the median
    of the rounds' ratios; the other consumers run once, against that round's batched loop."""
    await declare_topology(bench)
    pairs = []
    for _ in range(rounds):
        batched_run = await baseline_drain(bench, "batched", events)
        worker_run = await worker_drain(bench, events)
        pairs.append((batched_run, worker_run))
    ratios = [w["events_per_second"] / b["events_per_second"] for b, w in pairs]
    # The round of median ratio (the lower middle one of an even number) stands for the rounds.
    median_round = sorted(range(rounds), key=ratios.__getitem__)[(rounds - 1) // 2]
    batched, worker = pairs[median_round]
    naive = await baseline_drain(bench, "naive", events)
    untraced = await worker_drain(bench, events, OTEL_SDK_DISABLED="true")
    sampled = await sampled_worker_drain(bench, events)
    workers = await worker_drain(bench, events, processes=2)
    rows = [
        {
            "consumer": f"bare aio-pika, batched insert + ack multiple (median round of {rounds})",
            **_row(batched, batched),
        },
        {
            "consumer": f"worker (tracing 100%, metrics, logs; median round of {rounds})",
            **_row(worker, batched),
        },
        {"consumer": "bare aio-pika, one insert + one ack each", **_row(naive, batched)},
        {"consumer": "worker, tracing off (metrics, logs)", **_row(untraced, batched)},
        {"consumer": "worker, tracing 10% (parent-based)", **_row(sampled, batched)},
        {"consumer": "worker, 2 processes (competing consumers)", **_row(workers, batched)},
    ]
    return {
        "batched": batched,
        "naive": naive,
        "worker_untraced": untraced,
        "worker": worker,
        "worker_sampled_10": sampled,
        "workers_2": workers,
        "rounds": [{"batched": b, "worker": w} for b, w in pairs],
        "worker_vs_batched_each_round": ratios,
        "worker_vs_batched": ratios[median_round],
        "worker_untraced_vs_batched": (
            untraced["events_per_second"] / batched["events_per_second"]
        ),
        "target": 0.6,
        "table": rows,
        "rounds_table": [
            {
                "round": n,
                "batched loop events/s": round(b["events_per_second"]),
                "worker events/s": round(w["events_per_second"]),
                "ratio": round(ratio, 2),
            }
            for n, ((b, w), ratio) in enumerate(zip(pairs, ratios, strict=True), start=1)
        ],
    }


async def tracing_cost(bench: Bench, events: int) -> dict[str, Any]:
    await declare_topology(bench)
    off = await worker_drain(bench, events, OTEL_SDK_DISABLED="true")
    on = await worker_drain(bench, events)
    rows = [
        {"tracing": "off (OTEL_SDK_DISABLED)", **_row(off, off)},
        {"tracing": "on, 100% sampled, exported", **_row(on, off)},
    ]
    return {
        "off": off,
        "on": on,
        "on_vs_off": on["events_per_second"] / off["events_per_second"],
        "table": rows,
    }


def _row(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    return {
        "events": result["events"],
        "seconds": round(result["seconds"], 2),
        "events/s": round(result["events_per_second"]),
        "ratio": round(result["events_per_second"] / reference["events_per_second"], 2),
        "RSS MiB": None if result["rss_mib"] is None else round(result["rss_mib"], 1),
    }
