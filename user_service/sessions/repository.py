"""Every query on ``refresh_tokens``.

A refresh token is looked up by its hash alone: whoever presents it has no other credential,
and its tenant is the row's. Everything else is scoped to the token's family or its user.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import bindparam, exists, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import Interval

from shared.models import RefreshToken, User

# Tokens expired more than :keep ago, a batch at a time (replicas deleting at once skip each
# other's rows). An expired token is refused before anything else is looked at, so its row
# only records that it existed; its session's start travels with every newer token.
_DELETE_EXPIRED = text(
    """
    DELETE FROM refresh_tokens WHERE id IN (
        SELECT id FROM refresh_tokens WHERE expires_at < now() - :keep
        LIMIT :batch FOR UPDATE SKIP LOCKED
    )
    """
).bindparams(bindparam("keep", type_=Interval()))
DELETE_BATCH = 10_000

# One lock per family, for the transaction (a 64-bit hash of the family id).
_LOCK_FAMILY = text("SELECT pg_advisory_xact_lock(hashtextextended(:family, 0))")


class RefreshTokenRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(
        self,
        *,
        user: User,
        family_id: uuid.UUID,
        token_hash: bytes,
        expires_at: datetime,
        session_started_at: datetime,
    ) -> None:
        self._session.add(
            RefreshToken(
                id=uuid.uuid4(),
                tenant_id=user.tenant_id,
                user_id=user.id,
                family_id=family_id,
                token_hash=token_hash,
                expires_at=expires_at,
                session_started_at=session_started_at,
            )
        )
        await self._session.flush()

    async def find_for_update(self, token_hash: bytes) -> tuple[RefreshToken, User] | None:
        """The token and its user, with its whole family locked until the transaction ends.
        Every refresh, logout and revocation of one family takes its turn: two refreshes with
        one token, and a revocation racing a refresh, see each other's tokens (a row lock on
        the token alone would let a revocation miss the token a concurrent refresh is making).
        The key share lock on the user makes a removal of the account wait, or be seen."""
        family_id = await self._session.scalar(
            select(RefreshToken.family_id).where(RefreshToken.token_hash == token_hash)
        )
        if family_id is None:
            return None
        await self._session.execute(_LOCK_FAMILY, {"family": str(family_id)})
        statement = (
            select(RefreshToken, User)
            .join(User, User.id == RefreshToken.user_id)
            .where(RefreshToken.token_hash == token_hash)
            .with_for_update(key_share=True)
        )
        row = (await self._session.execute(statement)).one_or_none()
        return None if row is None else (row[0], row[1])

    async def family_revoked(self, family_id: uuid.UUID) -> bool:
        statement = select(
            exists().where(
                RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_not(None)
            )
        )
        return bool(await self._session.scalar(statement))

    async def mark_rotated(self, token: RefreshToken, at: datetime) -> None:
        token.rotated_at = at
        await self._session.flush()

    async def delete_expired(self, keep: timedelta) -> int:
        """Delete up to ``DELETE_BATCH`` tokens that expired more than ``keep`` ago; returns
        how many."""
        result = await self._session.execute(_DELETE_EXPIRED, {"keep": keep, "batch": DELETE_BATCH})
        deleted: int = result.rowcount  # type: ignore[attr-defined]
        return deleted

    async def revoke_family(self, family_id: uuid.UUID, at: datetime) -> None:
        await self._session.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=at)
        )
