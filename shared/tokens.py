"""Access-token verification, for every service that accepts a Bearer token.

A token is accepted only when all of this holds:
- its header names an algorithm on the allow-list (``alg: none``, HS256 and anything else are
  refused before a key is looked at) and a ``kid``;
- the ``kid`` is a key we trust: from a JWKS document (fetched, cached by ``kid``, refetched at
  most every ``min_refresh_seconds`` when an unknown ``kid`` shows up, so a rotated key is found
  without a restart) or from keys given in configuration;
- the signature verifies with that key;
- ``iss`` and ``aud`` are ours, ``exp`` is in the future, ``iat`` (and ``nbf``, if any) not
  more than a clock skew ahead of ours, and ``sub``, ``tenant_id``, ``role``, ``iat`` and
  ``jti`` are present and well-formed.

joserfc's ``jwt.decode`` checks only the signature; the claims go through ``JWTClaimsRegistry``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet, KeySetSerialization, OKPKey

from shared.errors import ServiceUnavailable, Unauthorized
from shared.tenancy import TENANT_ID_PATTERN

logger = logging.getLogger(__name__)

SIGNING_ALGORITHM = "Ed25519"
_TENANT_ID = re.compile(TENANT_ID_PATTERN)
# The roles a token may carry (shared.models.Role's values).
ROLES = frozenset({"owner", "admin", "member"})


_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]+-----.+?-----END [A-Z ]+-----", re.DOTALL)


class KeyConfigurationError(RuntimeError):
    """A configured key cannot be used: the process refuses to start with it."""


def public_keys_from_pem(text: str, *, setting: str) -> list[Key]:
    """The Ed25519 public keys in ``text``, one or more PEM blocks (as a setting holds them);
    a block that is not such a key stops the start, naming ``setting``."""
    blocks = _PEM_BLOCK.findall(text)
    if text.strip() and (not blocks or _PEM_BLOCK.sub("", text).strip()):
        # Base64 without its armour, a block cut short: refused, not skipped.
        raise KeyConfigurationError(f"{setting}: expected PEM blocks and nothing else")
    keys: list[Key] = []
    for block in blocks:
        try:
            key = OKPKey.import_key(block)
        except Exception as exc:  # joserfc and cryptography raise several types for a bad PEM
            raise KeyConfigurationError(f"{setting}: not an Ed25519 key in PEM") from exc
        if key.curve_name != "Ed25519":
            raise KeyConfigurationError(f"{setting}: not an Ed25519 key in PEM")
        keys.append(OKPKey.import_key(key.as_dict(private=False)))
    return keys


class KeysUnavailable(ServiceUnavailable):
    """The verification keys could not be fetched: the caller's token is not at fault."""

    detail = "Token verification keys are unavailable; try again shortly"


class InvalidToken(Unauthorized):
    detail = "Invalid or expired token"
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the verified claims of an access token."""

    user_id: uuid.UUID
    tenant_id: str
    role: str  # owner, admin or member, as when the token was issued
    token_id: str
    expires_at: datetime


class KeyProvider(Protocol):
    async def get(self, kid: str) -> Key | None: ...


class StaticKeys:
    """Keys given in configuration (a public key or a JWKS document)."""

    def __init__(self, keys: KeySet) -> None:
        self._by_kid = {key.kid: key for key in keys if key.kid}

    async def get(self, kid: str) -> Key | None:
        return self._by_kid.get(kid)


class JWKSKeys:
    """Keys from a JWKS endpoint, cached by ``kid``.

    The document is fetched on first use, again after ``ttl_seconds``, and again when a token
    names a ``kid`` we have not seen, but never more often than ``min_refresh_seconds`` (so a
    flood of forged ``kid`` values cannot turn into a flood of fetches). A failed fetch keeps
    the keys we had; with none yet, verification answers 503 (:class:`KeysUnavailable`). After
    a failure the fetch is tried again a second later; while it keeps failing with keys in hand,
    the tries grow apart, up to ``_MAX_RETRY_SECONDS`` (each may hold requests for the fetch's
    timeout, and the keys in hand still serve).
    """

    _RETRY_SECONDS = 1.0
    _MAX_RETRY_SECONDS = 30.0

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        ttl_seconds: float = 300.0,
        min_refresh_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._client = client
        self._clock = clock
        self._ttl = ttl_seconds
        self._min_refresh = min_refresh_seconds
        self._keys: dict[str, Key] = {}
        self._fetched_at: float | None = None
        self._failed_at: float | None = None
        self._retry_after = self._RETRY_SECONDS
        self._lock = asyncio.Lock()

    async def get(self, kid: str) -> Key | None:
        if self._should_fetch(kid):
            async with self._lock:
                if self._should_fetch(kid):  # another task may have fetched meanwhile
                    await self._refresh()
        if self._fetched_at is None:
            raise KeysUnavailable()
        return self._keys.get(kid)

    def _should_fetch(self, kid: str) -> bool:
        now = self._clock()
        if self._failed_at is not None and now - self._failed_at < self._retry_after:
            return False
        if self._fetched_at is None or now - self._fetched_at > self._ttl:
            return True
        return kid not in self._keys and now - self._fetched_at > self._min_refresh

    async def _refresh(self) -> None:
        try:
            response = await self._client.get(self.url, timeout=5.0)
            response.raise_for_status()
            key_set = KeySet.import_key_set(_key_set_document(response.json()))
        except (httpx.HTTPError, JoseError, ValueError, KeyError, TypeError) as exc:
            logger.warning("JWKS fetch failed", extra={"url": self.url, "error": repr(exc)})
            # The old keys stay, and stay due for a refresh: the next is tried after the pause,
            # not a whole TTL later (a key removed meanwhile must not stay trusted that long).
            if self._failed_at is not None and self._fetched_at is not None:
                self._retry_after = min(2 * self._retry_after, self._MAX_RETRY_SECONDS)
            self._failed_at = self._clock()
            return
        # An unchanged key keeps its object, so tokens remembered by TokenVerifier (which holds
        # the key that verified them) stay remembered across refreshes.
        self._keys = {key.kid: self._unchanged(key) for key in key_set if key.kid}
        self._fetched_at = self._clock()
        self._failed_at, self._retry_after = None, self._RETRY_SECONDS
        logger.debug("JWKS fetched", extra={"url": self.url, "keys": len(self._keys)})

    def _unchanged(self, key: Key) -> Key:
        known = self._keys.get(key.kid or "")
        return known if known is not None and known.thumbprint() == key.thumbprint() else key


def _key_set_document(document: Any) -> KeySetSerialization:
    """``document`` if it is shaped as a JWKS (an object whose ``keys`` is a list of objects):
    a URL that answers other JSON (a health check, say) is a failed fetch, not a crash."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
        raise ValueError("not a JWKS document")
    return KeySetSerialization(keys=keys)


# Clocks differ a little between hosts, and joserfc compares whole seconds: a token is refused as
# "issued in the future" (iat) or "not yet valid" (nbf) only beyond this; exp keeps the leeway
# configured (JWT_LEEWAY_SECONDS, none by default).
CLOCK_SKEW_SECONDS = 60


class _ClaimsRegistry(jwt.JWTClaimsRegistry):
    """joserfc's registry, with :data:`CLOCK_SKEW_SECONDS` of leeway for ``iat`` and ``nbf``."""

    def validate_iat(self, value: object) -> None:
        self._with_skew(super().validate_iat, value)

    def validate_nbf(self, value: object) -> None:
        self._with_skew(super().validate_nbf, value)

    def _with_skew(self, validate: Callable[[object], None], value: object) -> None:
        leeway, self.leeway = self.leeway, max(self.leeway, CLOCK_SKEW_SECONDS)
        try:
            validate(value)
        finally:
            self.leeway = leeway


class TokenVerifier:
    """Verifies tokens, and remembers the ones it verified (up to ``cache_size``, each at most
    ``cache_seconds`` and never past its ``exp``): a client sends the same token with every
    request, and checking it again costs a signature verification each time. A remembered
    token is accepted only while the key that verified it is still trusted. Tokens meant to
    live longer than ``max_lifetime_seconds`` (``exp - iat``) are refused."""

    def __init__(
        self,
        *,
        keys: KeyProvider,
        issuer: str,
        audience: str,
        algorithms: Collection[str] = (SIGNING_ALGORITHM,),
        leeway_seconds: int = 0,
        max_lifetime_seconds: int = 86_400,
        cache_size: int = 10_000,
        cache_seconds: float = 60.0,
    ) -> None:
        self._keys = keys
        self._algorithms = list(algorithms)
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._cache_size = cache_size
        self._cache_seconds = cache_seconds
        self._max_lifetime = max_lifetime_seconds
        self._claims = _ClaimsRegistry(
            leeway=leeway_seconds,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            iat={"essential": True},
            sub={"essential": True},
            jti={"essential": True},
            tenant_id={"essential": True},
            role={"essential": True},
        )

    async def verify(self, token: str) -> Principal:
        cached = self._cache.get(token)
        if cached is not None:
            # Still remembered, and its key still trusted (a key removed from the JWKS takes
            # its tokens with it at the next refresh, cache or not).
            if cached.until > time.monotonic() and await self._keys.get(cached.kid) is cached.key:
                if token in self._cache:  # other requests ran while the keys were checked
                    self._cache.move_to_end(token)
                return cached.principal
            self._cache.pop(token, None)
        principal, kid, key = await self._verify(token)
        remaining = principal.expires_at.timestamp() - time.time()
        until = time.monotonic() + min(remaining, self._cache_seconds)
        self._cache[token] = _Verified(principal, kid, key, until)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, str, Key]:
        try:
            header = jws.extract_compact(token.encode("ascii")).headers()
        except (JoseError, ValueError, UnicodeError, TypeError) as exc:
            raise InvalidToken() from exc
        if not isinstance(header, dict):  # JSON, but not an object: joserfc lets it through
            raise InvalidToken()
        kid = header.get("kid")
        if header.get("alg") not in self._algorithms or not isinstance(kid, str):
            raise InvalidToken()
        key = await self._keys.get(kid)
        if key is None:
            raise InvalidToken()
        try:
            claims = jwt.decode(token, key, algorithms=self._algorithms).claims
            self._claims.validate(claims)
            principal = _principal(claims)
        except (JoseError, ValueError, TypeError) as exc:
            raise InvalidToken() from exc
        if claims["exp"] - claims["iat"] > self._max_lifetime:
            raise InvalidToken()  # longer-lived than any token the issuer signs
        return principal, kid, key


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    kid: str
    key: Key
    until: float  # monotonic deadline of the cache entry


def _principal(claims: dict[str, Any]) -> Principal:
    tenant_id = claims["tenant_id"]
    if not isinstance(tenant_id, str) or not _TENANT_ID.fullmatch(tenant_id):
        raise ValueError("tenant_id claim is malformed")
    role = claims["role"]
    if role not in ROLES:
        raise ValueError("role claim is not a known role")
    exp = claims["exp"]
    if not isinstance(exp, int | float) or not isinstance(claims["iat"], int | float):
        raise ValueError("exp and iat must be numeric dates")
    return Principal(
        user_id=uuid.UUID(str(claims["sub"])),
        tenant_id=tenant_id,
        role=role,
        token_id=str(claims["jti"]),
        expires_at=datetime.fromtimestamp(exp, UTC),
    )
