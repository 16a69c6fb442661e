"""ASGI entry point: ``uvicorn campaign_service.main:app --port 8001``."""

from campaign_service.app import create_app
from shared.heap import freeze_once_started

app = freeze_once_started(create_app())
