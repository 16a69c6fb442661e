"""ASGI entry point: ``uvicorn user_service.main:app --port 8000``."""

from user_service.app import create_app

app = create_app()
