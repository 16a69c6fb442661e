"""Worker drain rate: N events already queued, zero simulated work; events per second until N
success rows exist, for the worker and for the bare loops it is measured against."""

from __future__ import annotations

from typing import Any

from benchmarks.harness import (
    Bench,
    CpuMeter,
    Process,
    declare_topology,
    free_port,
    processing_window,
    purge_worker_queue,
    python,
    queue_events,
    seed_campaigns,
    success_rows,
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
    rows from the first to the last; and the CPU the consumers spent per event from the first
    row on (their start-up is not the drain's; None when one exited before it was read: the
    bare loops stop at their count)."""
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
        await wait_for_rows(bench, 1, timeout=120)
        meter = CpuMeter({"consumers": lambda: [pid for p in processes for pid in p.pids()]})
        meter.start()
        before = await success_rows(bench)
        await wait_for_rows(bench, events, timeout=max(120, events / 100))
        spent, _ = meter.stop()
        sizes = [process.rss_mib() for process in processes]
        seconds = await processing_window(bench)
    finally:
        for process in processes:
            await process.stop()
    metered = events - before
    return {
        "events": events,
        "seconds": seconds,
        "events_per_second": events / seconds,
        "rss_mib": None if None in sizes else sum(size or 0 for size in sizes),
        "cpu_us_per_event": (
            None if None in sizes or metered <= 0 else 1e6 * spent["consumers"] / metered
        ),
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


# The targets: each worker's events per second over the batched loop's, the median of rounds.
TARGETS = {"worker": 0.3, "worker_sampled_10": 0.55, "worker_untraced": 0.7}
# Each round, back to back: the batched loop, then the worker three ways.
WORKERS = {
    "worker": "worker, tracing 100% (always_on), exported",
    "worker_sampled_10": "worker, tracing 10% (parentbased_traceidratio 0.1), exported",
    "worker_untraced": "worker, tracing off (OTEL_SDK_DISABLED)",
}


async def run(bench: Bench, events: int, rounds: int = 3) -> dict[str, Any]:
    """The worker, three ways (tracing 100%, 10% sampled, off), against the batched loop in
    ``rounds`` rounds, all four back to back in each, so that each ratio compares them over
    the same minute or two: on a shared host everything's speed drifts by more than a tenth
    from one minute to the next. Each target's figure is the median of its rounds' ratios; the
    two-process worker (tracing 100%) runs once, after the last round, against that round's
    batched loop (the nearest in time)."""
    await declare_topology(bench)
    each: list[dict[str, dict[str, Any]]] = []
    for _ in range(rounds):
        measured = {"batched": await baseline_drain(bench, "batched", events)}
        measured["worker"] = await worker_drain(bench, events)
        measured["worker_sampled_10"] = await sampled_worker_drain(bench, events)
        measured["worker_untraced"] = await worker_drain(bench, events, OTEL_SDK_DISABLED="true")
        each.append(measured)
    workers = await worker_drain(bench, events, processes=2)

    def rate(result: dict[str, Any]) -> float:
        return float(result["events_per_second"])

    ratios = {key: [rate(r[key]) / rate(r["batched"]) for r in each] for key in WORKERS}
    # The round of median ratio (the lower middle one of an even number) stands for the rounds.
    median_round = {key: _median_index(ratios[key]) for key in WORKERS}
    batched = each[median_round["worker"]]["batched"]
    chosen = {key: each[median_round[key]][key] for key in WORKERS}
    medians = {key: ratios[key][median_round[key]] for key in WORKERS}
    last_batched = each[-1]["batched"]
    rows = [
        {
            "consumer": "bare aio-pika loop, batched insert + ack multiple (the limit)",
            "events/s": round(rate(batched)),
            "vs batched loop": 1.0,
            "target": "",
            "met": "",
            "rounds' ratios": "",
            "CPU µs/event": _cpu(batched),
            "RSS MiB": _rss(batched),
        },
        *(
            {
                "consumer": label,
                "events/s": round(rate(chosen[key])),
                "vs batched loop": round(medians[key], 2),
                "target": f">= {TARGETS[key]}",
                "met": "yes" if medians[key] >= TARGETS[key] else "no",
                "rounds' ratios": ", ".join(f"{ratio:.2f}" for ratio in ratios[key]),
                "CPU µs/event": _cpu(chosen[key]),
                "RSS MiB": _rss(chosen[key]),
            }
            for key, label in WORKERS.items()
        ),
        {
            "consumer": "worker, tracing 100%, 2 processes (competing consumers)",
            "events/s": round(rate(workers)),
            "vs batched loop": round(rate(workers) / rate(last_batched), 2),
            "target": "",
            "met": "",
            "rounds' ratios": "once, vs the last round's loop",
            "CPU µs/event": _cpu(workers),
            "RSS MiB": _rss(workers),
        },
    ]
    return {
        "batched": batched,
        **chosen,
        "workers_2": workers,
        "workers_2_vs_batched": rate(workers) / rate(last_batched),
        "workers_2_vs_1": rate(workers) / rate(each[-1]["worker"]),
        "rounds": each,
        "each_round": ratios,
        "medians": medians,
        "targets": TARGETS,
        "met": {key: medians[key] >= TARGETS[key] for key in WORKERS},
        # As before: the traced worker's median ratio, and the untraced one's.
        "worker_vs_batched": medians["worker"],
        "worker_untraced_vs_batched": medians["worker_untraced"],
        "table": rows,
        "rounds_table": [
            {
                "round": n,
                "batched loop events/s": round(rate(r["batched"])),
                **{
                    column: value
                    for key, short in (
                        ("worker", "100%"),
                        ("worker_sampled_10", "10%"),
                        ("worker_untraced", "untraced"),
                    )
                    for column, value in (
                        (f"worker {short} events/s", round(rate(r[key]))),
                        (f"{short} ratio", round(ratios[key][n - 1], 2)),
                    )
                },
            }
            for n, r in enumerate(each, start=1)
        ],
    }


def _median_index(values: list[float]) -> int:
    """The index of the median value (the lower middle one of an even number)."""
    return sorted(range(len(values)), key=values.__getitem__)[(len(values) - 1) // 2]


def _rss(result: dict[str, Any]) -> float | None:
    return None if result["rss_mib"] is None else round(result["rss_mib"], 1)


def _cpu(result: dict[str, Any]) -> int | None:
    """The consumers' CPU per event (all their processes), from the first row on."""
    cpu = result.get("cpu_us_per_event")
    return None if cpu is None else round(cpu)


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
