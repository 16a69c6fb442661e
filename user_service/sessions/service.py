"""Sessions: a login starts a family of refresh tokens; each refresh rotates the token it is
given into a new one of the family; a rotated token presented again means it was stolen (or
replayed), and the whole family is revoked (OAuth 2.0 Security Best Current Practice, 4.14)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from shared.errors import Unauthorized
from shared.models import RefreshToken, User
from user_service.sessions.repository import RefreshTokenRepository
from user_service.tokens.issuer import TokenIssuer
from user_service.tokens.opaque import new_token, token_hash

logger = logging.getLogger(__name__)


class InvalidRefreshToken(Unauthorized):
    detail = "Invalid refresh token"


class RefreshTokenReused(InvalidRefreshToken):
    """A rotated token came back: its family has been revoked (a change to commit)."""


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


async def start(
    *,
    session: AsyncSession,
    tokens: TokenIssuer,
    user: User,
    ttl_seconds: int,
    continuing: RefreshToken | None = None,
) -> TokenPair:
    """An access token and a new refresh token: of a new session, or of the one ``continuing``
    was a token of."""
    refresh_token, digest = new_token()
    now = datetime.now(UTC)
    await RefreshTokenRepository(session).add(
        user=user,
        family_id=uuid.uuid4() if continuing is None else continuing.family_id,
        token_hash=digest,
        expires_at=now + timedelta(seconds=ttl_seconds),
        session_started_at=now if continuing is None else continuing.session_started_at,
    )
    access = tokens.issue(user_id=user.id, tenant_id=user.tenant_id, role=user.role)
    return TokenPair(access.access_token, access.expires_in, refresh_token, ttl_seconds)


async def refresh(
    *,
    session: AsyncSession,
    tokens: TokenIssuer,
    refresh_token: str,
    ttl_seconds: int,
    session_max_seconds: int,
) -> TokenPair:
    """A new pair for a valid refresh token; the new refresh token lives ``ttl_seconds``, but
    never past ``session_max_seconds`` after the session's login."""
    repository = RefreshTokenRepository(session)
    found = await repository.find_for_update(token_hash(refresh_token))
    now = datetime.now(UTC)
    if found is None:
        raise InvalidRefreshToken()
    token, user = found
    if token.revoked_at is not None or token.expires_at <= now:
        raise InvalidRefreshToken()
    if await repository.family_revoked(token.family_id):  # a second line: none of it is good
        raise InvalidRefreshToken()
    if token.rotated_at is not None:
        await repository.revoke_family(token.family_id, now)
        logger.warning(
            "a rotated refresh token was used again; its family is revoked",
            extra={
                "tenant_id": user.tenant_id,
                "user_id": str(user.id),
                "family_id": str(token.family_id),
            },
        )
        raise RefreshTokenReused()
    ends = token.session_started_at + timedelta(seconds=session_max_seconds)
    left = int((ends - now).total_seconds())
    if left < 1:  # the session is over, however recently refreshed: log in again
        raise InvalidRefreshToken()
    await repository.mark_rotated(token, now)
    return await start(
        session=session,
        tokens=tokens,
        user=user,
        ttl_seconds=min(ttl_seconds, left),
        continuing=token,
    )


async def logout(*, session: AsyncSession, refresh_token: str) -> None:
    """Revoke the token's family (nothing to do for a token that is not ours)."""
    repository = RefreshTokenRepository(session)
    found = await repository.find_for_update(token_hash(refresh_token))
    if found is not None:
        token, user = found
        await repository.revoke_family(token.family_id, datetime.now(UTC))
        logger.info(
            "logged out",
            extra={"tenant_id": user.tenant_id, "user_id": str(user.id)},
        )
