"""ASGI entry point: ``uvicorn gateway.main:app --port 8080``."""

from gateway.app import create_app
from shared.heap import freeze_once_started

app = freeze_once_started(create_app())
