"""Settings every process reads from its environment (pydantic-settings).

One environment name per thing across all services: ``DATABASE_URL``, ``RABBITMQ_URL``,
``LOG_LEVEL``, ``ENVIRONMENT`` … Each service combines :class:`CommonSettings` with the parts it
uses (:class:`DatabaseSettings`, :class:`BrokerSettings`) and what it alone needs. In
``ENVIRONMENT=production`` the validators refuse the development defaults (the local database
without a password or with a password the project ships, RabbitMQ's ``guest`` account, a
generated signing key).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/campaigns"
DEV_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Passwords that ship with the project (compose's fallback, .env.example's placeholder) or with
# the servers themselves: never fit for production.
KNOWN_DEV_PASSWORDS = frozenset({"campaigns-dev-password", "change-me", "guest", "postgres"})


def _credentials(url: str) -> tuple[str, str]:
    """The URL's user and password as the drivers use them: percent-decoded (``%67uest`` is
    ``guest`` to asyncpg and aio-pika alike)."""
    parts = urlsplit(url)
    return unquote(parts.username or ""), unquote(parts.password or "")


def _weak_password(url: str) -> bool:
    password = _credentials(url)[1]
    return not password or password in KNOWN_DEV_PASSWORDS


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class InsecureSettingsError(ValueError):
    """A production process was started with a development default."""


class CommonSettings(BaseSettings):
    """What every process reads. Subclasses add their parts (database, broker, their own)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Environment = Environment.DEVELOPMENT
    service_name: str = "campaign-platform"
    log_level: str = "INFO"

    # Largest request body an HTTP service reads (bytes); larger bodies get a 422.
    max_request_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # More request header fields, or a larger header section (bytes), get a 431 (shared.web).
    # An unfinished header section is bounded by the server (uvicorn --http h11
    # --h11-max-incomplete-event-size), at the edge by nginx (nginx/edge.conf).
    max_request_header_fields: int = Field(default=100, ge=10)
    max_request_header_bytes: int = Field(default=16 * 1024, ge=1024)
    # How long /ready waits for each dependency before calling it unreachable.
    readiness_timeout_seconds: float = Field(default=2.0, gt=0)
    # Allocations (net, of container objects) between two young-generation collections, once
    # the service has started (shared.heap). Python's own default, 700, means a collection
    # every request or two on the hot paths.
    gc_gen0_threshold: int = Field(default=50_000, ge=100)

    @property
    def is_production(self) -> bool:
        return self.environment is Environment.PRODUCTION

    @model_validator(mode="after")
    def _refuse_development_defaults_in_production(self) -> Self:
        if not self.is_production:
            return self
        problems = self.production_problems()
        if problems:
            raise InsecureSettingsError(
                "refusing to start with development defaults in production: " + "; ".join(problems)
            )
        return self

    def production_problems(self) -> list[str]:
        """What makes these settings unfit for production (each part adds its own)."""
        return []


class DatabaseSettings(CommonSettings):
    database_url: str = DEV_DATABASE_URL
    # A fixed pool: overflow connections are opened and closed again under sustained load,
    # and each new connection costs a TLS negotiation attempt and a handshake.
    database_pool_size: int = Field(default=20, ge=1, le=200)
    database_max_overflow: int = Field(default=0, ge=0, le=200)
    database_pool_timeout_seconds: float = Field(default=10.0, gt=0)
    database_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # Test each pooled connection before use: three extra round trips per request. Off, a
    # connection left stale by a database restart fails once (a 503) and is replaced.
    database_pool_pre_ping: bool = False
    database_statement_timeout_ms: int = Field(default=15_000, ge=0)

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if self.database_url == DEV_DATABASE_URL or _weak_password(self.database_url):
            problems.append(
                "DATABASE_URL must name a user with a password of its own (not a development one)"
            )
        return problems


class BrokerSettings(CommonSettings):
    rabbitmq_url: str = DEV_RABBITMQ_URL
    # Pause between reconnection attempts once connected (aio-pika's robust connection).
    rabbitmq_reconnect_seconds: float = Field(default=5.0, gt=0)

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if _credentials(self.rabbitmq_url)[0] in ("", "guest") or _weak_password(self.rabbitmq_url):
            problems.append(
                "RABBITMQ_URL must name a user other than guest, with a password of its own"
                " (not a development one)"
            )
        return problems
