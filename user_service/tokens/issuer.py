from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from joserfc import jwt

from shared.tokens import SIGNING_ALGORITHM
from user_service.tokens.keys import SigningKeys


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: str
    expires_in: int


class TokenIssuer:
    def __init__(self, keys: SigningKeys, *, issuer: str, audience: str, ttl_seconds: int) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._ttl = ttl_seconds

    def issue(self, *, user_id: uuid.UUID, tenant_id: str, role: str) -> IssuedToken:
        now = int(time.time())
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": str(user_id),
            "tenant_id": tenant_id,
            "role": role,
            "iat": now,
            "exp": now + self._ttl,
            "jti": uuid.uuid4().hex,
        }
        header = {"alg": SIGNING_ALGORITHM, "kid": self._keys.kid}
        token = jwt.encode(header, claims, self._keys.signing_key, algorithms=[SIGNING_ALGORITHM])
        return IssuedToken(access_token=token, expires_in=self._ttl)
