from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from shared.settings import BrokerSettings, DatabaseSettings


class WorkerSettings(DatabaseSettings, BrokerSettings):
    service_name: str = "worker"

    # Messages the broker hands this process before any is acknowledged; how many of them are
    # processed as one batch (one query, one insert, one ack), and how many of a batch's
    # campaigns are executed at once (0 means the whole batch). The prefetch should be larger
    # than the batch, so the next batch arrives while one is written.
    worker_prefetch: int = Field(default=1000, ge=1, le=10_000)
    worker_batch_max: int = Field(default=500, ge=1, le=10_000)
    worker_concurrency: int = Field(default=0, ge=0, le=10_000)
    # Attempts per event, and the wait before each retry (seconds, comma-separated; the last
    # value repeats when there are more retries than values).
    worker_max_attempts: int = Field(default=4, ge=1, le=100)
    worker_retry_delays_seconds: Annotated[tuple[float, ...], NoDecode] = (1.0, 5.0, 30.0)
    # How long a stopping worker waits for the messages it is processing.
    worker_graceful_timeout_seconds: float = Field(default=15.0, gt=0)
    # While PostgreSQL is away, a message is held and its write retried with backoff up to this
    # pause (it is not acknowledged, not dead-lettered, and no attempt is spent).
    worker_db_retry_max_seconds: float = Field(default=5.0, gt=0)
    worker_publish_timeout_seconds: float = Field(default=5.0, gt=0)
    # Simulated execution time of one campaign.
    worker_simulated_work_seconds: float = Field(default=0.0, ge=0)
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=9000, ge=1, le=65535)

    @field_validator("worker_retry_delays_seconds", mode="before")
    @classmethod
    def _parse_delays(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("worker_retry_delays_seconds")
    @classmethod
    def _delays_positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("retry delays must be one or more positive numbers of seconds")
        return value

    @property
    def concurrency(self) -> int:
        return min(self.worker_concurrency or self.worker_batch_max, self.worker_batch_max)

    def retry_delay(self, failed_attempt: int) -> float:
        """The wait after attempt ``failed_attempt`` (1-based) failed."""
        delays = self.worker_retry_delays_seconds
        return delays[min(failed_attempt, len(delays)) - 1]

    @property
    def retry_delays_in_use(self) -> tuple[float, ...]:
        """The delays the configured attempts can reach: one delay queue each."""
        return tuple(
            sorted({self.retry_delay(attempt) for attempt in range(1, self.worker_max_attempts)})
        )
