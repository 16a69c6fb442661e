from __future__ import annotations

from pydantic import Field

from shared.settings import BrokerSettings, DatabaseSettings


class DeadLetterSettings(DatabaseSettings, BrokerSettings):
    """The ``deadletters`` tool's settings: the platform's broker and database (``RABBITMQ_URL``,
    ``DATABASE_URL``), and its own bounds."""

    service_name: str = "deadletters"
    # Messages one run reads at most (each is held in memory until the run ends).
    deadletters_scan_max: int = Field(default=10_000, ge=1, le=1_000_000)
    # How long the broker and the database each get to answer the first time.
    deadletters_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    # How long a replay's publish waits for the broker's confirm.
    deadletters_publish_timeout_seconds: float = Field(default=5.0, gt=0)
    # One connection is all the tool uses.
    database_pool_size: int = Field(default=1, ge=1, le=200)
