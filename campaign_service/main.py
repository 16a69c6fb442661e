"""ASGI entry point: ``uvicorn campaign_service.main:app --port 8001``."""

from campaign_service.app import create_app

app = create_app()
