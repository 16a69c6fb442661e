from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from user_service.settings import UserServiceSettings
from user_service.tokens.issuer import TokenIssuer
from user_service.users.passwords import PasswordHasher
from user_service.users.throttle import LoginThrottle


async def get_password_hasher(request: Request) -> PasswordHasher:
    hasher: PasswordHasher = request.app.state.passwords
    return hasher


async def get_token_issuer(request: Request) -> TokenIssuer:
    issuer: TokenIssuer = request.app.state.token_issuer
    return issuer


async def get_login_throttle(request: Request) -> LoginThrottle:
    throttle: LoginThrottle = request.app.state.login_throttle
    return throttle


async def get_settings(request: Request) -> UserServiceSettings:
    settings: UserServiceSettings = request.app.state.settings
    return settings


async def client_address(request: Request) -> str:
    """The caller's address: the peer's, or the one a trusted proxy (the gateway) forwarded
    (uvicorn's ``--forwarded-allow-ips``, FORWARDED_ALLOW_IPS)."""
    return request.client.host if request.client else "unknown"


PasswordsDep = Annotated[PasswordHasher, Depends(get_password_hasher)]
TokenIssuerDep = Annotated[TokenIssuer, Depends(get_token_issuer)]
LoginThrottleDep = Annotated[LoginThrottle, Depends(get_login_throttle)]
SettingsDep = Annotated[UserServiceSettings, Depends(get_settings)]
ClientAddress = Annotated[str, Depends(client_address)]
