"""The framework's own floor: a FastStream subscriber set up by the worker's own functions (same
broker, queue, manual acks, no dependency injection, prefetch) whose handler only
acknowledges. No database, no logs, no metrics. With ``--tracing`` the worker's telemetry
middleware is on, sampling and exporting every message as the worker does.

Whatever the worker does per message comes on top of this, so its drain rate can never exceed
this figure; the drain table prints it beside the worker's.

    python -m tests.benchmarks.framework_consumer --count 20000 [--tracing]

Prints one JSON line: the events acknowledged and the seconds from the first delivery to the
last acknowledgement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from faststream.rabbit.message import RabbitMessage

from shared.telemetry import RabbitTracing, configure_tracing
from worker.app import create_worker_broker, subscribe_worker_queue
from worker.settings import WorkerSettings


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--tracing", action="store_true")
    args = parser.parse_args()
    settings = WorkerSettings()
    middlewares = [RabbitTracing(configure_tracing("framework-consumer"))] if args.tracing else []
    broker = create_worker_broker(settings, app_id="framework-consumer", middlewares=middlewares)
    done = asyncio.Event()
    acked = 0
    first = 0.0

    @subscribe_worker_queue(broker)
    async def acknowledge(message: RabbitMessage) -> None:
        nonlocal acked, first
        if acked == 0:
            first = time.perf_counter()
        await message.ack()
        acked += 1
        if acked >= args.count:
            done.set()

    await broker.start()
    try:
        await done.wait()
        seconds = time.perf_counter() - first
    finally:
        await broker.stop()
    print(json.dumps({"events": acked, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
