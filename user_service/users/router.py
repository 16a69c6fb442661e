from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, status

from shared.db import SessionDep
from user_service.metrics import UserMetricsDep
from user_service.users import service
from user_service.users.dependencies import (
    ClientAddress,
    LoginThrottleDep,
    PasswordsDep,
    SettingsDep,
    TokenIssuerDep,
)
from user_service.users.exceptions import (
    EmailAlreadyRegistered,
    InvalidCredentials,
    InvitationRequired,
)
from user_service.users.schemas import LoginRequest, RegisterRequest, TokenResponse, UserRead

router = APIRouter(tags=["users"])


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    responses={
        403: {"description": "The tenant exists, and no valid invitation for this email was given"},
        429: {"description": "Too many registrations from this address"},
        409: {"description": "The email is already registered in this tenant"},
    },
)
async def register(
    data: RegisterRequest,
    session: SessionDep,
    passwords: PasswordsDep,
    throttle: LoginThrottleDep,
    address: ClientAddress,
    metrics: UserMetricsDep,
) -> UserRead:
    """Create a tenant (the caller becomes its owner), or join one with an invitation."""
    try:
        user = await service.register(
            session=session, passwords=passwords, throttle=throttle, data=data, address=address
        )
    except EmailAlreadyRegistered:
        metrics.registrations.labels("conflict").inc()
        raise
    except InvitationRequired:
        metrics.registrations.labels("forbidden").inc()
        raise
    metrics.registrations.labels("created").inc()
    return UserRead.model_validate(user)


@router.post(
    "/login",
    responses={
        401: {"description": "Incorrect email or password"},
        429: {"description": "Too many failed logins for this account or from this address"},
    },
)
async def login(
    data: LoginRequest,
    session: SessionDep,
    passwords: PasswordsDep,
    tokens: TokenIssuerDep,
    throttle: LoginThrottleDep,
    settings: SettingsDep,
    address: ClientAddress,
    metrics: UserMetricsDep,
) -> TokenResponse:
    try:
        pair = await service.login(
            session=session,
            passwords=passwords,
            tokens=tokens,
            throttle=throttle,
            data=data,
            address=address,
            refresh_ttl_seconds=settings.refresh_token_ttl_seconds,
        )
    except InvalidCredentials:
        metrics.logins.labels("failure").inc()
        raise
    metrics.logins.labels("success").inc()
    return TokenResponse(**asdict(pair))
