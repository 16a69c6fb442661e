"""ASGI entry point: ``uvicorn gateway.main:app --port 8080``."""

from gateway.app import create_app

app = create_app()
