from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from user_service.tokens.keys import SigningKeys

router = APIRouter(tags=["tokens"])


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens")
async def jwks(request: Request, response: Response) -> dict[str, Any]:
    keys: SigningKeys = request.app.state.signing_keys
    response.headers["Cache-Control"] = "public, max-age=300"
    return keys.jwks()
