from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from user_service.tokens.issuer import TokenIssuer
from user_service.users.passwords import PasswordHasher


async def get_password_hasher(request: Request) -> PasswordHasher:
    hasher: PasswordHasher = request.app.state.passwords
    return hasher


async def get_token_issuer(request: Request) -> TokenIssuer:
    issuer: TokenIssuer = request.app.state.token_issuer
    return issuer


PasswordsDep = Annotated[PasswordHasher, Depends(get_password_hasher)]
TokenIssuerDep = Annotated[TokenIssuer, Depends(get_token_issuer)]
