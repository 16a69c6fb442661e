from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.settings import DatabaseSettings


class UserServiceSettings(DatabaseSettings):
    service_name: str = "user_service"

    # Tokens. The signing key is an Ed25519 private key in PEM, given inline or as a file (a
    # mounted secret). Public keys of retired signing keys stay in the JWKS (PEM, one or more)
    # until every token they signed has expired: that is how keys rotate without logouts.
    jwt_issuer: str = "campaign-platform"
    jwt_audience: str = "campaign-platform"
    jwt_access_token_ttl_seconds: int = Field(default=900, ge=60, le=86_400)
    jwt_private_key: SecretStr | None = None
    jwt_private_key_file: Path | None = None
    jwt_previous_public_keys: str | None = None
    jwt_previous_public_keys_file: Path | None = None
    # Outside production, with no key configured, a key is generated once and kept here.
    jwt_dev_key_file: Path = Path(".dev/jwt-signing-key.pem")

    # Threads that hash and verify passwords, so the event loop never does. One fewer than the
    # cores by default: hashing never takes the core the event loop answers requests on.
    password_hash_threads: int = Field(
        default_factory=lambda: max(1, (os.cpu_count() or 2) - 1), ge=1, le=64
    )
    # argon2id cost (OWASP's baseline: 19 MiB, 2 passes, 1 lane). Stored hashes with other
    # parameters still verify, and are upgraded at the next successful login.
    password_argon2_memory_kib: int = Field(default=19 * 1024, ge=8 * 1024)
    password_argon2_time_cost: int = Field(default=2, ge=1)
    password_argon2_parallelism: int = Field(default=1, ge=1, le=16)
    # Hashes that may wait for a thread; beyond, login and registration answer 503.
    password_hash_queue_limit: int = Field(default=200, ge=0, le=100_000)

    # Sessions and invitations.
    refresh_token_ttl_seconds: int = Field(default=30 * 86_400, ge=60, le=365 * 86_400)
    # A login's session (its family of refresh tokens) ends this long after the login, however
    # often it is refreshed: a refresh token stolen and kept fresh by rotation dies with it.
    refresh_session_max_seconds: int = Field(default=90 * 86_400, ge=60, le=3650 * 86_400)
    # A refresh token's row is deleted this long after it expired.
    refresh_token_retention_seconds: int = Field(default=7 * 86_400, ge=0, le=3650 * 86_400)
    # How often each process deletes the rows that no longer mean anything (idle login counts,
    # refresh tokens long expired): without it those tables only grow.
    housekeeping_interval_seconds: float = Field(default=600.0, ge=1, le=86_400)
    invitation_ttl_seconds: int = Field(default=7 * 86_400, ge=60, le=90 * 86_400)

    # Login throttling (counters in PostgreSQL, shared by every replica). After
    # ``login_max_failures`` failed logins of one account (tenant and email, known or not) within
    # the window, its logins are refused for the base delay, doubled with every further failure
    # up to the maximum; a successful login clears them. ``login_address_max_failures`` failures
    # from one client address, whatever the accounts, refuse its logins until the window ends.
    login_max_failures: int = Field(default=5, ge=1, le=1_000)
    login_failure_window_seconds: int = Field(default=900, ge=1, le=86_400)
    login_throttle_base_seconds: int = Field(default=60, ge=1, le=86_400)
    login_throttle_max_seconds: int = Field(default=900, ge=1, le=86_400)
    login_address_max_failures: int = Field(default=100, ge=1, le=1_000_000)
    # A count nobody has touched for this long after its window and any block ended is
    # forgotten (its account or address starts again from zero).
    login_throttle_forget_seconds: int = Field(default=86_400, ge=60, le=365 * 86_400)
    # Logins of one client address being hashed at once, per process; more are refused at once.
    login_max_in_flight_per_address: int = Field(default=4, ge=1, le=1_000)

    @field_validator(
        "jwt_private_key",
        "jwt_private_key_file",
        "jwt_previous_public_keys",
        "jwt_previous_public_keys_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker compose passes an unset ${VAR:-} as an empty string.
        return None if value == "" else value

    @model_validator(mode="after")
    def _session_outlives_a_token(self) -> UserServiceSettings:
        if self.refresh_session_max_seconds < self.refresh_token_ttl_seconds:
            raise ValueError(
                "REFRESH_SESSION_MAX_SECONDS must be at least REFRESH_TOKEN_TTL_SECONDS"
            )
        return self

    def production_problems(self) -> list[str]:
        problems = super().production_problems()
        if self.jwt_private_key is None and self.jwt_private_key_file is None:
            problems.append("JWT_PRIVATE_KEY or JWT_PRIVATE_KEY_FILE must be set")
        return problems
