"""ASGI entry point: ``uvicorn user_service.main:app --port 8000``."""

from shared.heap import freeze_once_started
from user_service.app import create_app

app = freeze_once_started(create_app())
