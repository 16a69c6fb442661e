from __future__ import annotations

from pydantic import Field

from shared.settings import BrokerSettings, DatabaseSettings


class CampaignServiceSettings(DatabaseSettings, BrokerSettings):
    service_name: str = "campaign_service"

    # Token verification: keys from user_service's JWKS, or from configured public keys (PEM,
    # one or more) when JWT_PUBLIC_KEYS is set. Issuer and audience must match user_service's.
    jwt_issuer: str = "campaign-platform"
    jwt_audience: str = "campaign-platform"
    jwt_jwks_url: str = "http://127.0.0.1:8000/.well-known/jwks.json"
    jwt_public_keys: str | None = None
    jwt_jwks_cache_seconds: float = Field(default=300.0, gt=0)
    jwt_leeway_seconds: int = Field(default=0, ge=0, le=300)

    # The outbox relay: messages published together (and rows claimed per transaction), the
    # poll for rows the process that wrote them did not publish (a broker outage, a stop,
    # another replica's), how long after its commit a row becomes the poll's (before that, its
    # own process publishes it, within half that time; 0 leaves every row to the poll),
    # the bound on one publish, and the longest pause before retrying a refused row.
    outbox_batch_size: int = Field(default=100, ge=1, le=10_000)
    outbox_poll_interval_seconds: float = Field(default=1.0, gt=0)
    outbox_claim_after_seconds: float = Field(default=10.0, ge=0)
    outbox_publish_timeout_seconds: float = Field(default=5.0, gt=0)
    outbox_max_backoff_seconds: float = Field(default=30.0, gt=0)
    # Connections the relay publishes on, side by side (each a FastStream broker): a channel
    # sends its messages one at a time, each waiting for the event loop to write it, so under
    # load one channel alone caps how many events a process publishes per second.
    outbox_publish_connections: int = Field(default=4, ge=1, le=64)
