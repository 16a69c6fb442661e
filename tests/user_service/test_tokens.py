"""Token verification (shared.tokens) against tokens from the real user_service and forgeries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey

from shared.tokens import InvalidToken, JWKSKeys, KeysUnavailable, StaticKeys, TokenVerifier
from tests.support.users import USER_SERVICE_URL, new_private_key_pem
from user_service.settings import UserServiceSettings
from user_service.tokens.keys import load_signing_keys

JWKS_URL = f"{USER_SERVICE_URL}/.well-known/jwks.json"
PASSWORD = "correct horse battery staple"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


async def token_for(client: httpx.AsyncClient, tenant: str) -> str:
    credentials = {"tenant_id": tenant, "email": "ada@example.com", "password": PASSWORD}
    await client.post("/register", json=credentials)
    response = await client.post("/login", json=credentials)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


class CountingTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return await self.inner.handle_async_request(request)


@pytest.fixture
def verifier(user_client: httpx.AsyncClient, user_settings: UserServiceSettings) -> TokenVerifier:
    return TokenVerifier(
        keys=JWKSKeys(JWKS_URL, user_client),
        issuer=user_settings.jwt_issuer,
        audience=user_settings.jwt_audience,
    )


@pytest.fixture
def sign(user_settings: UserServiceSettings) -> Callable[..., str]:
    """Sign claims with the service's own key, to vary one claim at a time."""
    keys = load_signing_keys(user_settings)

    def _sign(claims: dict[str, Any], key: OKPKey | None = None, kid: str | None = None) -> str:
        header = {"alg": "Ed25519", "kid": kid or keys.kid}
        return jwt.encode(header, claims, key or keys.signing_key, algorithms=["Ed25519"])

    return _sign


def claims(settings: UserServiceSettings, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": "6d0c2a5e-3f0a-4a53-9d59-1f7f2f7e2b11",
        "tenant_id": "acme",
        "role": "member",
        "iat": now,
        "exp": now + 60,
        "jti": "a1",
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def sign_any(settings: UserServiceSettings) -> str:
    """A well-formed token under a key of its own (for a verifier that never gets that far)."""
    key = OKPKey.generate_key("Ed25519")
    header = {"alg": "Ed25519", "kid": key.thumbprint()}
    return jwt.encode(header, claims(settings), key, algorithms=["Ed25519"])


class TestTokenVerification:
    async def test_accepts_a_valid_token(
        self, verifier: TokenVerifier, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        principal = await verifier.verify(await token_for(user_client, tenant))

        assert principal.tenant_id == tenant
        assert principal.role == "owner"

    async def test_changed_payload_is_refused(
        self, verifier: TokenVerifier, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        header, payload, signature = (await token_for(user_client, tenant)).split(".")
        forged = {**unb64(payload), "tenant_id": "someone-else"}

        with pytest.raises(InvalidToken):
            await verifier.verify(f"{header}.{b64(json.dumps(forged).encode())}.{signature}")

    async def test_token_signed_by_another_key_is_refused(
        self,
        verifier: TokenVerifier,
        sign: Callable[..., str],
        user_settings: UserServiceSettings,
    ) -> None:
        # Same kid as the real key, but signed by an attacker's key.
        attacker = OKPKey.generate_key("Ed25519")

        with pytest.raises(InvalidToken):
            await verifier.verify(sign(claims(user_settings), key=attacker))

    async def test_unknown_kid_is_refused(
        self,
        verifier: TokenVerifier,
        sign: Callable[..., str],
        user_settings: UserServiceSettings,
    ) -> None:
        attacker = OKPKey.generate_key("Ed25519")

        with pytest.raises(InvalidToken):
            await verifier.verify(
                sign(claims(user_settings), key=attacker, kid=attacker.thumbprint())
            )

    async def test_alg_none_is_refused(
        self, verifier: TokenVerifier, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        header, payload, _ = (await token_for(user_client, tenant)).split(".")
        none_header = {**unb64(header), "alg": "none"}

        with pytest.raises(InvalidToken):
            await verifier.verify(f"{b64(json.dumps(none_header).encode())}.{payload}.")

    async def test_hs256_signed_with_the_public_key_is_refused(
        self, verifier: TokenVerifier, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        token = await token_for(user_client, tenant)
        header, payload, _ = token.split(".")
        jwks = (await user_client.get("/.well-known/jwks.json")).json()
        public_pem = OKPKey.import_key(jwks["keys"][0]).as_pem(private=False)
        hs_header = b64(json.dumps({**unb64(header), "alg": "HS256"}).encode())
        for secret in (public_pem, json.dumps(jwks["keys"][0]).encode()):
            mac = hmac.new(secret, f"{hs_header}.{payload}".encode(), hashlib.sha256).digest()

            with pytest.raises(InvalidToken):
                await verifier.verify(f"{hs_header}.{payload}.{b64(mac)}")

    @pytest.mark.parametrize(
        "change",
        [
            {"exp": int(time.time()) - 5},
            {"aud": "another-audience"},
            {"iss": "https://evil.example"},
            {"tenant_id": None},
            {"tenant_id": "Not A Tenant"},
            {"sub": None},
            {"sub": "not-a-uuid"},
            {"exp": None},
            {"iat": None},
            {"jti": None},
            {"role": None},
            {"role": "superuser"},
            {"role": "OWNER"},
            {"role": ["owner"]},
        ],
        ids=lambda change: ",".join(f"{key}={value}" for key, value in change.items()),
    )
    async def test_bad_claims_are_refused(
        self,
        verifier: TokenVerifier,
        sign: Callable[..., str],
        user_settings: UserServiceSettings,
        change: dict[str, Any],
    ) -> None:
        assert (await verifier.verify(sign(claims(user_settings)))).tenant_id == "acme"

        with pytest.raises(InvalidToken):
            await verifier.verify(sign(claims(user_settings, **change)))

    @pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "a.b", "ü.ü.ü", "e30.e30.e30"])
    async def test_garbage_is_refused(self, verifier: TokenVerifier, garbage: str) -> None:
        with pytest.raises(InvalidToken):
            await verifier.verify(garbage)

    @pytest.mark.parametrize("claim", ["iat", "nbf"])
    async def test_a_clock_ahead_of_ours_by_a_skew_is_accepted_and_by_more_refused(
        self,
        verifier: TokenVerifier,
        sign: Callable[..., str],
        user_settings: UserServiceSettings,
        claim: str,
    ) -> None:
        """The issuer's host may run ahead of the verifier's: a token used the moment it is
        issued must pass (joserfc compares whole seconds, so even 0.1 s of skew refused some)."""
        now = int(time.time())
        ahead = sign(claims(user_settings, **{claim: now + 30}, exp=now + 90))
        assert (await verifier.verify(ahead)).tenant_id == "acme"

        with pytest.raises(InvalidToken):
            await verifier.verify(sign(claims(user_settings, **{claim: now + 120}, exp=now + 180)))

    @pytest.mark.parametrize(
        "document",
        [{}, {"status": "ok"}, {"keys": None}, [], {"keys": [1]}],
        ids=["empty", "health-check", "null-keys", "array", "key-not-object"],
    )
    async def test_a_jwks_url_answering_other_json_is_an_unavailable_jwks(
        self, user_settings: UserServiceSettings, document: Any
    ) -> None:
        """503 (KeysUnavailable), not a 500, and not a fetch for every request."""
        transport = CountingTransport(
            httpx.MockTransport(lambda _: httpx.Response(200, json=document))
        )
        async with httpx.AsyncClient(transport=transport) as client:
            verifier = TokenVerifier(
                keys=JWKSKeys(JWKS_URL, client),
                issuer=user_settings.jwt_issuer,
                audience=user_settings.jwt_audience,
            )
            token = sign_any(user_settings)
            for _ in range(3):
                with pytest.raises(KeysUnavailable):
                    await verifier.verify(token)

        assert transport.requests == 1  # retried after a pause, not at once

    async def test_jwks_is_fetched_once_and_cached_by_kid(
        self, user_client: httpx.AsyncClient, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        transport = CountingTransport(user_client._transport)
        async with httpx.AsyncClient(transport=transport, base_url=USER_SERVICE_URL) as client:
            verifier = TokenVerifier(
                keys=JWKSKeys(JWKS_URL, client),
                issuer=user_settings.jwt_issuer,
                audience=user_settings.jwt_audience,
            )
            token = await token_for(user_client, tenant)
            for _ in range(5):
                await verifier.verify(token)

        assert transport.requests == 1

    async def test_static_keys_from_configuration(
        self, user_settings: UserServiceSettings, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        keys = StaticKeys(load_signing_keys(user_settings).verification_keys())
        verifier = TokenVerifier(
            keys=keys, issuer=user_settings.jwt_issuer, audience=user_settings.jwt_audience
        )

        assert (await verifier.verify(await token_for(user_client, tenant))).tenant_id == tenant


class TestRememberedTokens:
    async def test_a_remembered_token_goes_when_its_key_goes(
        self, start_user_service: Any, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        old_pem, new_pem = new_private_key_pem(), new_private_key_pem()
        async with start_user_service(jwt_private_key=old_pem) as old_service:
            keys = JWKSKeys(JWKS_URL, old_service, min_refresh_seconds=0, ttl_seconds=0)
            verifier = TokenVerifier(
                keys=keys, issuer=user_settings.jwt_issuer, audience=user_settings.jwt_audience
            )
            token = await token_for(old_service, tenant)
            assert (await verifier.verify(token)).tenant_id == tenant  # verified, remembered
            async with start_user_service(jwt_private_key=new_pem) as new_service:
                keys._client = new_service  # the old key is no longer published

                with pytest.raises(InvalidToken):
                    await verifier.verify(token)

    async def test_a_failed_refresh_does_not_keep_a_removed_key_for_another_ttl(
        self, start_user_service: Any, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        """The JWKS is away when its TTL runs out, then comes back without the old key: the old
        key's tokens go at the next try, a second later, not a whole TTL after the failure."""
        now = 0.0
        old_pem, new_pem = new_private_key_pem(), new_private_key_pem()

        async with (
            start_user_service(jwt_private_key=old_pem) as old_service,
            httpx.AsyncClient(transport=httpx.MockTransport(unreachable)) as away,
        ):
            keys = JWKSKeys(JWKS_URL, old_service, ttl_seconds=300, clock=lambda: now)
            verifier = TokenVerifier(
                keys=keys, issuer=user_settings.jwt_issuer, audience=user_settings.jwt_audience
            )
            token = await token_for(old_service, tenant)
            assert (await verifier.verify(token)).tenant_id == tenant
            keys._client, now = away, 301.0  # due for a refresh, which fails: the keys stay
            assert (await verifier.verify(token)).tenant_id == tenant
            async with start_user_service(jwt_private_key=new_pem) as new_service:
                keys._client, now = new_service, 303.0  # back, without the old key

                with pytest.raises(InvalidToken):
                    await verifier.verify(token)

    async def test_while_the_jwks_stays_away_its_fetches_grow_apart(
        self, user_client: httpx.AsyncClient, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        """Each try may hold requests for the fetch's timeout: 1, 2, 4, 8, 16 s apart (at most
        30), while the keys in hand serve."""
        now = 0.0
        keys = JWKSKeys(JWKS_URL, user_client, ttl_seconds=300, clock=lambda: now)
        verifier = TokenVerifier(
            keys=keys, issuer=user_settings.jwt_issuer, audience=user_settings.jwt_audience
        )
        token = await token_for(user_client, tenant)
        assert (await verifier.verify(token)).tenant_id == tenant
        tries = CountingTransport(httpx.MockTransport(unreachable))
        tried_at: list[float] = []
        async with httpx.AsyncClient(transport=tries) as away:
            keys._client = away
            for tenth in range(3010, 3400):  # every 0.1 s from the TTL's end, for 39 s
                now, before = tenth / 10, tries.requests
                assert (await verifier.verify(token)).tenant_id == tenant
                if tries.requests > before:
                    tried_at.append(now)

        assert [round(b - a, 1) for a, b in itertools.pairwise(tried_at)] == [1, 2, 4, 8, 16]

    async def test_a_remembered_token_stays_remembered_across_jwks_refreshes(
        self,
        monkeypatch: pytest.MonkeyPatch,
        user_client: httpx.AsyncClient,
        user_settings: UserServiceSettings,
        tenant: str,
    ) -> None:
        decoded = 0
        decode = jwt.decode

        def counting_decode(*args: Any, **kwargs: Any) -> Any:
            nonlocal decoded
            decoded += 1
            return decode(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting_decode)
        transport = CountingTransport(user_client._transport)
        async with httpx.AsyncClient(transport=transport, base_url=USER_SERVICE_URL) as client:
            verifier = TokenVerifier(
                keys=JWKSKeys(JWKS_URL, client, ttl_seconds=0),  # a fetch before every check
                issuer=user_settings.jwt_issuer,
                audience=user_settings.jwt_audience,
            )
            token = await token_for(user_client, tenant)
            for _ in range(3):
                assert (await verifier.verify(token)).tenant_id == tenant

        assert transport.requests == 3
        assert decoded == 1  # its signature was checked once, not once per refresh

    async def test_concurrent_checks_when_the_key_object_changed(
        self, user_settings: UserServiceSettings, user_client: httpx.AsyncClient, tenant: str
    ) -> None:
        published = load_signing_keys(user_settings).verification_keys().as_dict()

        class SlowKeys:
            def __init__(self) -> None:
                self.reload()

            def reload(self) -> None:
                imported = KeySet.import_key_set(published)
                self.by_kid = {key.kid: key for key in imported if key.kid}

            async def get(self, kid: str) -> Any:
                await asyncio.sleep(0)  # as a JWKS fetch would: other requests run meanwhile
                return self.by_kid.get(kid)

        keys = SlowKeys()
        verifier = TokenVerifier(
            keys=keys, issuer=user_settings.jwt_issuer, audience=user_settings.jwt_audience
        )
        token = await token_for(user_client, tenant)
        await verifier.verify(token)
        keys.reload()  # new key objects: the remembered entry must be checked again

        principals = await asyncio.gather(*(verifier.verify(token) for _ in range(5)))

        assert {principal.tenant_id for principal in principals} == {tenant}

    async def test_tokens_living_longer_than_any_issued_are_refused(
        self,
        sign: Callable[..., str],
        user_settings: UserServiceSettings,
        user_client: httpx.AsyncClient,
    ) -> None:
        verifier = TokenVerifier(
            keys=JWKSKeys(JWKS_URL, user_client),
            issuer=user_settings.jwt_issuer,
            audience=user_settings.jwt_audience,
            max_lifetime_seconds=3600,
        )
        now = int(time.time())

        with pytest.raises(InvalidToken):
            await verifier.verify(sign(claims(user_settings, iat=now, exp=now + 86_400 * 365)))


class TestKeyRotation:
    async def test_tokens_of_the_previous_key_stay_valid(
        self, start_user_service: Any, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        old_pem, new_pem = new_private_key_pem(), new_private_key_pem()
        old_public = OKPKey.import_key(old_pem).as_pem(private=False).decode()

        async with start_user_service(jwt_private_key=old_pem) as old_service:
            old_token = await token_for(old_service, tenant)

        async with start_user_service(
            jwt_private_key=new_pem, jwt_previous_public_keys=old_public
        ) as new_service:
            jwks = (await new_service.get("/.well-known/jwks.json")).json()
            verifier = TokenVerifier(
                keys=JWKSKeys(JWKS_URL, new_service),
                issuer=user_settings.jwt_issuer,
                audience=user_settings.jwt_audience,
            )
            new_token = await token_for(new_service, tenant)

            assert {key["kid"] for key in jwks["keys"]} == {
                OKPKey.import_key(old_pem).thumbprint(),
                OKPKey.import_key(new_pem).thumbprint(),
            }
            assert all(key["alg"] == "Ed25519" and key["use"] == "sig" for key in jwks["keys"])
            assert all("d" not in key for key in jwks["keys"])  # no private part published
            assert (await verifier.verify(old_token)).tenant_id == tenant
            assert (await verifier.verify(new_token)).tenant_id == tenant

    async def test_verifier_finds_a_new_key_without_restart(
        self, start_user_service: Any, user_settings: UserServiceSettings, tenant: str
    ) -> None:
        first_pem, second_pem = new_private_key_pem(), new_private_key_pem()
        async with start_user_service(jwt_private_key=first_pem) as first:
            keys = JWKSKeys(JWKS_URL, first, min_refresh_seconds=0)
            verifier = TokenVerifier(
                keys=keys, issuer=user_settings.jwt_issuer, audience=user_settings.jwt_audience
            )
            await verifier.verify(await token_for(first, tenant))
            async with start_user_service(jwt_private_key=second_pem) as second:
                keys._client = second  # the same URL now serves the rotated key set
                assert (await verifier.verify(await token_for(second, tenant))).tenant_id == tenant


class TestDevelopmentKey:
    async def test_generated_once_kept_and_warned_about(
        self,
        start_user_service: Any,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        key_file = tmp_path / "dev" / "signing-key.pem"
        caplog.set_level(logging.WARNING)

        async with start_user_service(jwt_private_key=None, jwt_dev_key_file=key_file) as service:
            first = (await service.get("/.well-known/jwks.json")).json()
        async with start_user_service(jwt_private_key=None, jwt_dev_key_file=key_file) as service:
            second = (await service.get("/.well-known/jwks.json")).json()

        assert key_file.stat().st_mode & 0o777 == 0o600
        assert first == second
        assert KeySet.import_key_set(first)
        assert any("development key" in record.getMessage() for record in caplog.records)

    def test_replicas_starting_together_share_one_key(self, tmp_path: Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tests.support.users import make_user_settings

        key_file = tmp_path / "shared-volume" / "key.pem"
        settings = make_user_settings("postgresql+asyncpg://unused/db", jwt_private_key=None)
        settings = settings.model_copy(update={"jwt_dev_key_file": key_file})

        with ThreadPoolExecutor(max_workers=8) as pool:
            kids = set(pool.map(lambda _: load_signing_keys(settings).kid, range(16)))

        assert len(kids) == 1
        assert [path.name for path in key_file.parent.iterdir()] == ["key.pem"]
