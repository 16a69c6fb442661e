"""What user_service deletes on its own, every ``HOUSEKEEPING_INTERVAL_SECONDS`` in each process:
rows that no longer mean anything, which would otherwise pile up for ever (a login count for
every account and address that ever failed, every refresh token ever issued). Each delete is a
batch found through an index, so a round costs little however large the tables."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from user_service.sessions.repository import DELETE_BATCH, RefreshTokenRepository
from user_service.users.throttle import LoginThrottle

logger = logging.getLogger(__name__)

Chore = Callable[[], Awaitable[int]]


def chores(
    *,
    throttle: LoginThrottle,
    sessionmaker: async_sessionmaker[AsyncSession],
    forget_login_counts_after: timedelta,
    keep_expired_tokens: timedelta,
) -> dict[str, Chore]:
    async def expired_tokens() -> int:
        deleted = 0
        while True:
            async with sessionmaker() as session, session.begin():
                batch = await RefreshTokenRepository(session).delete_expired(keep_expired_tokens)
            deleted += batch
            if batch < DELETE_BATCH:
                return deleted

    async def idle_login_counts() -> int:
        return await throttle.forget_idle(forget_login_counts_after)

    return {"idle login counts": idle_login_counts, "expired refresh tokens": expired_tokens}


async def run_every(interval: float, work: Mapping[str, Chore]) -> None:
    """Each chore now and about every ``interval`` seconds, until cancelled; one that fails
    (the database away) is logged and tried again next time."""
    while True:
        for name, chore in work.items():
            try:
                with suppress_instrumentation():  # housekeeping, not worth a trace
                    deleted = await chore()
            except Exception as exc:
                logger.warning("housekeeping failed", extra={"chore": name, "error": repr(exc)})
            else:
                if deleted:
                    logger.info("housekeeping", extra={"chore": name, "rows": deleted})
        # Replicas started together drift apart rather than deleting in step.
        await asyncio.sleep(interval * random.uniform(0.75, 1.25))  # noqa: S311 (timing, not secrets)
