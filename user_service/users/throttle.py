"""Login throttling: password guessing against one account, credential stuffing from one client
address, and a storm of logins from one place holding every hashing thread.

Every login attempt is admitted before its password is looked at, and counted as it is
admitted, in one transaction over the account's and the address's rows (locked, so concurrent
attempts take turns): a burst of guesses cannot all slip past the limit before any of them has
failed. The attempt that reaches an account's limit blocks the account at once; a successful
login clears the account's count and gives the address its attempt back. An unknown account is
counted exactly like a known one, so a 429 reveals nothing about which emails exist.

The counters live in PostgreSQL (``login_throttles``), so every replica sees the same ones, and
are written in transactions of their own: a failed login answers 401 and its request's unit of
work rolls back, but its attempt counts.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.types import Interval, Text

from shared.errors import TooManyRequests
from user_service.metrics import UserMetrics

logger = logging.getLogger(__name__)


class LoginThrottled(TooManyRequests):
    detail = "Too many failed logins; try again later"


class RegistrationThrottled(TooManyRequests):
    detail = "Too many registrations from this address; try again later"


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


_ENSURE = text(
    """
    INSERT INTO login_throttles (key, failures, window_started_at)
    SELECT key, 0, now() FROM unnest(:keys) AS key
    ON CONFLICT (key) DO NOTHING
    """
).bindparams(bindparam("keys", type_=ARRAY(Text())))
_LOCK = text(
    """
    SELECT key, failures, window_started_at, blocked_until, now() AS now
    FROM login_throttles WHERE key = ANY(:keys) ORDER BY key FOR UPDATE
    """
).bindparams(bindparam("keys", type_=ARRAY(Text())))
_SET = text(
    """
    UPDATE login_throttles
    SET failures = :failures, window_started_at = :started, blocked_until = :blocked
    WHERE key = :key
    """
)
_CLEAR = text("DELETE FROM login_throttles WHERE key = :key")
_GIVE_BACK = text(
    "UPDATE login_throttles SET failures = greatest(failures - 1, 0) WHERE key = :key"
)

# Counts whose window and any block ended more than :forget ago, a batch at a time (replicas
# purging at once skip each other's rows).
_FORGET = text(
    """
    DELETE FROM login_throttles WHERE key IN (
        SELECT key FROM login_throttles
        WHERE window_started_at < now() - :forget - :window
          AND (blocked_until IS NULL OR blocked_until < now() - :forget)
        LIMIT :batch FOR UPDATE SKIP LOCKED
    )
    """
).bindparams(bindparam("window", type_=Interval()), bindparam("forget", type_=Interval()))
_FORGET_BATCH = 10_000


@dataclass(slots=True)
class _Count:
    key: str
    failures: int
    started: datetime
    blocked: datetime | None


def _row(count: _Count) -> dict[str, object]:
    return {
        "key": count.key,
        "failures": count.failures,
        "started": count.started,
        "blocked": count.blocked,
    }


def registration_key(address: str) -> str:
    return f"registration:{address}"


def account_key(tenant_id: str, email: str) -> str:
    return f"account:{tenant_id}:{email}"


def address_key(address: str) -> str:
    return f"address:{address}"


class LoginThrottle:
    def __init__(self, engine: AsyncEngine, policy: ThrottlePolicy, metrics: UserMetrics) -> None:
        self._engine = engine
        self._policy = policy
        self._metrics = metrics
        self._in_flight: Counter[str] = Counter()

    async def admit(self, *, tenant_id: str, email: str, address: str) -> None:
        """Count this attempt against the account and the address, or raise
        :class:`LoginThrottled` (counting nothing) while either is refused."""
        account, by_address = account_key(tenant_id, email), address_key(address)
        async with self._engine.begin() as connection:
            counts, now = await self._locked(connection, [account, by_address])
            refusals = [
                (key, count.blocked)
                for key, count in counts.items()
                if count.blocked is not None and count.blocked > now
            ]
            if refusals:
                key, until = max(refusals, key=lambda refusal: refusal[1])
                scope = "address" if key == by_address else "account"
                seconds = math.ceil((until - now).total_seconds())
                # Nothing written: the transaction ends with the refusal.
                self._refuse(scope, tenant_id, address, seconds)
            policy = self._policy
            own = counts[account]
            own.failures += 1
            if (block := policy.account_block_seconds(own.failures)) is not None:
                own.blocked = now + timedelta(seconds=block)  # lifted by a success
            shared = counts[by_address]
            shared.failures += 1
            if shared.failures >= policy.address_max_failures:
                shared.blocked = shared.started + policy.window
            await connection.execute(_SET, [_row(count) for count in counts.values()])

    async def admit_registration(self, *, tenant_id: str, address: str) -> None:
        """Count a registration from ``address`` (each costs a password hash), or raise
        :class:`LoginThrottled` once the address has made ``address_max_failures`` of them in
        the window."""
        key = registration_key(address)
        async with self._engine.begin() as connection:
            counts, now = await self._locked(connection, [key])
            count = counts[key]
            if count.blocked is not None and count.blocked > now:
                seconds = math.ceil((count.blocked - now).total_seconds())
                self._refuse("registration", tenant_id, address, seconds, RegistrationThrottled)
            count.failures += 1
            if count.failures >= self._policy.address_max_failures:
                count.blocked = count.started + self._policy.window
            await connection.execute(_SET, [_row(count)])

    async def _locked(
        self, connection: AsyncConnection, keys: list[str]
    ) -> tuple[dict[str, _Count], datetime]:
        """The keys' counts, locked (in key order: no deadlock between two attempts), with the
        database's time; a count whose window has passed starts again."""
        while True:
            await connection.execute(_ENSURE, {"keys": keys})
            rows = (await connection.execute(_LOCK, {"keys": keys})).all()
            if len(rows) == len(set(keys)):
                break
            # The housekeeping forgot a count between the two statements: make it again.
        now: datetime = rows[0].now
        counts = {}
        for row in rows:
            if row.window_started_at <= now - self._policy.window:
                # A new window: a block still running stays, and the count halves rather than
                # starting again, so a patient guesser does not get a fresh allowance each time.
                blocked = row.blocked_until
                still = blocked if blocked is not None and blocked > now else None
                counts[row.key] = _Count(row.key, row.failures // 2, now, still)
            else:
                counts[row.key] = _Count(
                    row.key, row.failures, row.window_started_at, row.blocked_until
                )
        return counts, now

    @contextlib.contextmanager
    def hashing(self, *, tenant_id: str, address: str) -> Iterator[None]:
        """Hold one of the address's places for a password hash, or raise at once."""
        if self._in_flight[address] >= self._policy.max_in_flight_per_address:
            self._refuse("in_flight", tenant_id, address, 1, TooManyRequests)
        self._in_flight[address] += 1
        try:
            yield
        finally:
            self._in_flight[address] -= 1
            if not self._in_flight[address]:
                del self._in_flight[address]

    async def succeeded(self, *, tenant_id: str, email: str, address: str) -> None:
        """Clear the account's count, and give the address its attempt back."""
        async with self._engine.begin() as connection:
            await connection.execute(_CLEAR, {"key": account_key(tenant_id, email)})
            await connection.execute(_GIVE_BACK, {"key": address_key(address)})

    async def forget_idle(self, after: timedelta) -> int:
        """Delete the counts nobody has touched for ``after`` since their window and any block
        ended; returns how many."""
        forgotten = 0
        while True:
            async with self._engine.begin() as connection:
                result = await connection.execute(
                    _FORGET,
                    {"window": self._policy.window, "forget": after, "batch": _FORGET_BATCH},
                )
            forgotten += result.rowcount
            if result.rowcount < _FORGET_BATCH:
                return forgotten

    def _refuse(
        self,
        scope: str,
        tenant_id: str,
        address: str,
        seconds: int,
        error: type[TooManyRequests] = LoginThrottled,
    ) -> None:
        self._metrics.logins_throttled.labels(scope).inc()
        logger.warning(
            "registration throttled" if scope == "registration" else "login throttled",
            extra={
                "scope": scope,
                "tenant_id": tenant_id,
                "client_address": address,
                "retry_after_seconds": seconds,
            },
        )
        raise error(retry_after_seconds=seconds)
