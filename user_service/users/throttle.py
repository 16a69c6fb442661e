"""Login throttling: password guessing against one account, credential stuffing from one client
address, and a storm of logins from one place holding every hashing thread.

The counters live in PostgreSQL (``login_throttles``), so every replica sees the same ones, and
are written on their own connection, in autocommit: a failed login answers 401 and its request's
unit of work rolls back, but its failure must count. An unknown account is counted exactly like
a known one, so a 429 reveals nothing about which emails exist.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.errors import TooManyRequests
from user_service.metrics import UserMetrics

logger = logging.getLogger(__name__)


class LoginThrottled(TooManyRequests):
    detail = "Too many failed logins; try again later"


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    max_failures: int
    window: timedelta
    base_seconds: int
    max_seconds: int
    address_max_failures: int
    max_in_flight_per_address: int

    def account_block_seconds(self, failures: int) -> int | None:
        """How long an account with ``failures`` in the window is refused (None: it is not)."""
        if failures < self.max_failures:
            return None
        doublings = min(failures - self.max_failures, 32)
        return int(min(self.base_seconds * 2**doublings, self.max_seconds))


_BLOCKED = text(
    """
    SELECT key, extract(epoch FROM blocked_until - now()) AS seconds
    FROM login_throttles
    WHERE key IN (:account, :address) AND blocked_until > now()
    """
)
# Count one failure, in a window that starts again once the last one has passed.
_FAILED = text(
    """
    INSERT INTO login_throttles AS t (key, failures, window_started_at)
    VALUES (:key, 1, now())
    ON CONFLICT (key) DO UPDATE SET
        failures = CASE WHEN t.window_started_at > now() - CAST(:window AS interval)
                        THEN t.failures + 1 ELSE 1 END,
        window_started_at = CASE WHEN t.window_started_at > now() - CAST(:window AS interval)
                                 THEN t.window_started_at ELSE now() END
    RETURNING failures, window_started_at
    """
)
_BLOCK_FOR = text(
    "UPDATE login_throttles SET blocked_until = now() + make_interval(secs => :seconds) "
    "WHERE key = :key"
)
_BLOCK = text(
    """
    UPDATE login_throttles SET blocked_until = greatest(blocked_until, :until)
    WHERE key = :key
    """
)
_CLEAR = text("DELETE FROM login_throttles WHERE key = :key")


def account_key(tenant_id: str, email: str) -> str:
    return f"account:{tenant_id}:{email}"


def address_key(address: str) -> str:
    return f"address:{address}"


class LoginThrottle:
    def __init__(self, engine: AsyncEngine, policy: ThrottlePolicy, metrics: UserMetrics) -> None:
        # Each statement commits by itself, whatever becomes of the request.
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._policy = policy
        self._metrics = metrics
        self._in_flight: Counter[str] = Counter()

    async def check(self, *, tenant_id: str, email: str, address: str) -> None:
        """Raise :class:`LoginThrottled` while the account or the address is refused."""
        params = {"account": account_key(tenant_id, email), "address": address_key(address)}
        async with self._engine.connect() as connection:
            rows = (await connection.execute(_BLOCKED, params)).all()
        if rows:
            scope = "address" if any(key == params["address"] for key, _ in rows) else "account"
            seconds = math.ceil(max(float(remaining) for _, remaining in rows))
            self._refuse(scope, tenant_id, address, seconds)

    @contextlib.contextmanager
    def hashing(self, *, tenant_id: str, address: str) -> Iterator[None]:
        """Hold one of the address's places for a password hash, or raise at once."""
        if self._in_flight[address] >= self._policy.max_in_flight_per_address:
            self._refuse("in_flight", tenant_id, address, 1)
        self._in_flight[address] += 1
        try:
            yield
        finally:
            self._in_flight[address] -= 1
            if not self._in_flight[address]:
                del self._in_flight[address]

    async def failed(self, *, tenant_id: str, email: str, address: str) -> None:
        """Count a failed login against the account and the address."""
        window = self._policy.window
        async with self._engine.connect() as connection:
            account = account_key(tenant_id, email)
            failures, _ = (
                await connection.execute(_FAILED, {"key": account, "window": window})
            ).one()
            if (seconds := self._policy.account_block_seconds(failures)) is not None:
                await connection.execute(_BLOCK_FOR, {"key": account, "seconds": float(seconds)})
            by_address = address_key(address)
            failures, started = (
                await connection.execute(_FAILED, {"key": by_address, "window": window})
            ).one()
            if failures >= self._policy.address_max_failures:
                await connection.execute(_BLOCK, {"key": by_address, "until": started + window})

    async def succeeded(self, *, tenant_id: str, email: str) -> None:
        async with self._engine.connect() as connection:
            await connection.execute(_CLEAR, {"key": account_key(tenant_id, email)})

    def _refuse(self, scope: str, tenant_id: str, address: str, seconds: int) -> None:
        self._metrics.logins_throttled.labels(scope).inc()
        logger.warning(
            "login throttled",
            extra={
                "scope": scope,
                "tenant_id": tenant_id,
                "client_address": address,
                "retry_after_seconds": seconds,
            },
        )
        raise LoginThrottled(retry_after_seconds=seconds)
