"""Who is calling: the Bearer token, verified by shared.tokens, as a typed dependency."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.errors import Unauthorized
from shared.tokens import Principal, TokenVerifier

_bearer = HTTPBearer(auto_error=False, description="An access token from POST /login")


async def current_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        # No credentials at all: a bare challenge (RFC 6750 section 3), no error code.
        raise Unauthorized("Not authenticated")
    verifier: TokenVerifier = request.app.state.token_verifier
    return await verifier.verify(credentials.credentials)


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
