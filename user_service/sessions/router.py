from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Response, status

from shared.db import SessionDep
from user_service.metrics import UserMetricsDep
from user_service.sessions import service
from user_service.sessions.service import InvalidRefreshToken, RefreshTokenReused
from user_service.users.dependencies import SettingsDep, TokenIssuerDep
from user_service.users.schemas import RefreshRequest, TokenResponse

router = APIRouter(tags=["sessions"])


@router.post(
    "/token/refresh",
    responses={401: {"description": "Invalid, expired, revoked or already used refresh token"}},
)
async def refresh(
    data: RefreshRequest,
    settings: SettingsDep,
    session: SessionDep,
    tokens: TokenIssuerDep,
    metrics: UserMetricsDep,
) -> TokenResponse:
    """Trade a refresh token for a new access token and a new refresh token; the one given
    stops working. Presenting one that was already traded revokes every token of its login."""
    try:
        pair = await service.refresh(
            session=session,
            tokens=tokens,
            refresh_token=data.refresh_token,
            ttl_seconds=settings.refresh_token_ttl_seconds,
            session_max_seconds=settings.refresh_session_max_seconds,
        )
    except RefreshTokenReused:
        metrics.refreshes.labels("reused").inc()
        await session.commit()  # the revocation stands, though the answer is an error
        raise
    except InvalidRefreshToken:
        metrics.refreshes.labels("invalid").inc()
        raise
    metrics.refreshes.labels("rotated").inc()
    return TokenResponse(**asdict(pair))


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(data: RefreshRequest, session: SessionDep) -> Response:
    """End the session the refresh token belongs to: it and every token of its login stop
    working. Answers 204 whether or not the token was valid."""
    await service.logout(session=session, refresh_token=data.refresh_token)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
