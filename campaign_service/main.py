"""ASGI entry point: ``uvicorn campaign_service.main:app --port 8001`` (``WEB_CONCURRENCY=N``: N
processes, whose metrics add up: shared/multiprocess.py)."""

from shared.multiprocess import share_metrics_across_processes

# First: prometheus_client, imported by the app, chooses its mode once, on import.
share_metrics_across_processes("campaign_service")

from campaign_service.app import create_app  # noqa: E402
from shared.heap import freeze_once_started  # noqa: E402
from shared.multiprocess import mark_dead_on_shutdown  # noqa: E402

app = mark_dead_on_shutdown(freeze_once_started(create_app()))
