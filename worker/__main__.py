"""``python -m worker``: the worker, with /health, /ready and /metrics on WORKER_METRICS_PORT.

SIGTERM or Ctrl-C: stop taking deliveries, finish or requeue the messages in hand, exit.
"""

from __future__ import annotations

import uvicorn

from shared.heap import freeze_once_started
from worker.app import create_app
from worker.settings import WorkerSettings


def main() -> None:
    settings = WorkerSettings()
    uvicorn.run(
        freeze_once_started(create_app(settings)),
        host=settings.worker_metrics_host,
        port=settings.worker_metrics_port,
        # One process: uvicorn would otherwise take WEB_CONCURRENCY from the environment and,
        # given an app object rather than an import string, exit. Workers scale as processes
        # or replicas of their own, competing for the queue.
        workers=1,
        log_config=None,
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
