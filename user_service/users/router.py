from __future__ import annotations

from fastapi import APIRouter, status

from shared.db import SessionDep
from user_service.metrics import UserMetricsDep
from user_service.users import service
from user_service.users.dependencies import PasswordsDep, TokenIssuerDep
from user_service.users.exceptions import EmailAlreadyRegistered, InvalidCredentials
from user_service.users.schemas import LoginRequest, RegisterRequest, TokenResponse, UserRead

router = APIRouter(tags=["users"])


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "The email is already registered in this tenant"}},
)
async def register(
    data: RegisterRequest, session: SessionDep, passwords: PasswordsDep, metrics: UserMetricsDep
) -> UserRead:
    try:
        user = await service.register(session=session, passwords=passwords, data=data)
    except EmailAlreadyRegistered:
        metrics.registrations.labels("conflict").inc()
        raise
    metrics.registrations.labels("created").inc()
    return UserRead.model_validate(user)


@router.post("/login", responses={401: {"description": "Incorrect email or password"}})
async def login(
    data: LoginRequest,
    session: SessionDep,
    passwords: PasswordsDep,
    tokens: TokenIssuerDep,
    metrics: UserMetricsDep,
) -> TokenResponse:
    try:
        issued = await service.login(session=session, passwords=passwords, tokens=tokens, data=data)
    except InvalidCredentials:
        metrics.logins.labels("failure").inc()
        raise
    metrics.logins.labels("success").inc()
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)
