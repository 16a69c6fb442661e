"""Every query on ``refresh_tokens``.

A refresh token is looked up by its hash alone: whoever presents it has no other credential,
and its tenant is the row's. Everything else is scoped to the token's family or its user.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import RefreshToken, User


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
    ) -> None:
        self._session.add(
            RefreshToken(
                id=uuid.uuid4(),
                tenant_id=user.tenant_id,
                user_id=user.id,
                family_id=family_id,
                token_hash=token_hash,
                expires_at=expires_at,
            )
        )
        await self._session.flush()

    async def find_for_update(self, token_hash: bytes) -> tuple[RefreshToken, User] | None:
        """The token and its user, locked until the transaction ends (two refreshes with one
        token take turns: the second finds it rotated)."""
        statement = (
            select(RefreshToken, User)
            .join(User, User.id == RefreshToken.user_id)
            .where(RefreshToken.token_hash == token_hash)
            .with_for_update(of=RefreshToken)
        )
        row = (await self._session.execute(statement)).one_or_none()
        return None if row is None else (row[0], row[1])

    async def mark_rotated(self, token: RefreshToken, at: datetime) -> None:
        token.rotated_at = at
        await self._session.flush()

    async def revoke_family(self, family_id: uuid.UUID, at: datetime) -> None:
        await self._session.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=at)
        )
