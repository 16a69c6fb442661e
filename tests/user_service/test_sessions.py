"""Sessions: a login's refresh token rotates on every use; reuse of a rotated one, or a logout,
ends the whole family; campaign_service takes the access tokens of every role."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from campaign_service.app import create_app as create_campaign_app
from tests.pipeline.conftest import CAMPAIGN_SERVICE_URL, make_campaign_settings, wait_ready
from tests.support.polling import eventually
from tests.support.users import (
    bearer,
    invite_and_register,
    logged_in,
    owner_headers,
    register,
    token_claims,
)
from user_service.settings import UserServiceSettings
from user_service.tokens.opaque import token_hash

INVALID = {"detail": "Invalid refresh token"}
TOKEN_FIELDS = {"access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}


async def refresh(client: httpx.AsyncClient, refresh_token: str) -> httpx.Response:
    return await client.post("/token/refresh", json={"refresh_token": refresh_token})


async def refreshed(client: httpx.AsyncClient, refresh_token: str) -> dict[str, Any]:
    response = await refresh(client, refresh_token)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


async def logout(client: httpx.AsyncClient, refresh_token: str) -> httpx.Response:
    return await client.post("/logout", json={"refresh_token": refresh_token})


@pytest.fixture
async def session(user_client: httpx.AsyncClient, tenant: str) -> dict[str, Any]:
    """A fresh login of the tenant's owner."""
    assert (await register(user_client, tenant)).status_code == 201
    return await logged_in(user_client, tenant)


class TestLogin:
    async def test_returns_a_refresh_token(
        self, session: dict[str, Any], user_settings: UserServiceSettings
    ) -> None:
        assert set(session) == TOKEN_FIELDS
        assert session["token_type"] == "bearer"
        assert session["refresh_expires_in"] == user_settings.refresh_token_ttl_seconds
        assert isinstance(session["refresh_token"], str)
        assert len(session["refresh_token"]) >= 32
        assert session["refresh_token"] != session["access_token"]

    async def test_each_login_gets_its_own_refresh_token(
        self, user_client: httpx.AsyncClient, tenant: str, session: dict[str, Any]
    ) -> None:
        again = await logged_in(user_client, tenant)

        assert again["refresh_token"] != session["refresh_token"]


class TestRefresh:
    async def test_rotates_the_pair(
        self,
        user_client: httpx.AsyncClient,
        user_settings: UserServiceSettings,
        session: dict[str, Any],
    ) -> None:
        tokens = await refreshed(user_client, session["refresh_token"])

        assert set(tokens) == TOKEN_FIELDS
        assert tokens["token_type"] == "bearer"
        assert tokens["expires_in"] == user_settings.jwt_access_token_ttl_seconds
        assert tokens["refresh_token"] != session["refresh_token"]
        assert tokens["access_token"] != session["access_token"]
        old, new = token_claims(session["access_token"]), token_claims(tokens["access_token"])
        assert (new["sub"], new["tenant_id"], new["role"]) == (
            old["sub"],
            old["tenant_id"],
            "owner",
        )
        assert new["jti"] != old["jti"]
        members = await user_client.get("/members", headers=bearer(tokens["access_token"]))
        assert members.status_code == 200

        reused = await refresh(user_client, session["refresh_token"])

        assert (reused.status_code, reused.json()) == (401, INVALID)

    async def test_a_chain_of_refreshes(
        self, user_client: httpx.AsyncClient, session: dict[str, Any]
    ) -> None:
        token = session["refresh_token"]
        seen = {token}
        for _ in range(3):
            token = (await refreshed(user_client, token))["refresh_token"]
            seen.add(token)

        assert len(seen) == 4
        assert (await refresh(user_client, token)).status_code == 200

    async def test_reuse_of_a_rotated_token_revokes_the_family(
        self, user_client: httpx.AsyncClient, tenant: str, session: dict[str, Any]
    ) -> None:
        other_session = await logged_in(user_client, tenant)
        second = await refreshed(user_client, session["refresh_token"])
        third = await refreshed(user_client, second["refresh_token"])

        reused = await refresh(user_client, session["refresh_token"])  # stolen and replayed
        newest = await refresh(user_client, third["refresh_token"])

        assert (reused.status_code, reused.json()) == (401, INVALID)
        assert (newest.status_code, newest.json()) == (401, INVALID)
        # Another login's family is another session: it goes on.
        assert (await refresh(user_client, other_session["refresh_token"])).status_code == 200

    async def test_racing_refreshes_with_one_token_rotate_it_once(
        self, user_client: httpx.AsyncClient, session: dict[str, Any]
    ) -> None:
        """Two holders of one token (the user and a thief) presenting it at once: one rotation,
        the others are reuse, and the family goes."""
        responses = await asyncio.gather(
            *(refresh(user_client, session["refresh_token"]) for _ in range(5))
        )

        assert sorted(response.status_code for response in responses) == [200] + [401] * 4
        [winner] = [response.json() for response in responses if response.status_code == 200]
        assert (await refresh(user_client, winner["refresh_token"])).json() == INVALID

    async def test_an_expired_token_is_refused(
        self, user_client: httpx.AsyncClient, session: dict[str, Any], db: asyncpg.Connection
    ) -> None:
        user_id = uuid.UUID(token_claims(session["access_token"])["sub"])
        await db.execute(
            "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE user_id = $1",
            user_id,
        )

        response = await refresh(user_client, session["refresh_token"])

        assert (response.status_code, response.json()) == (401, INVALID)

    async def test_a_session_ends_its_maximum_after_the_login_however_often_refreshed(
        self,
        user_client: httpx.AsyncClient,
        user_settings: UserServiceSettings,
        session: dict[str, Any],
        db: asyncpg.Connection,
    ) -> None:
        """The login was a day short of the maximum ago: the refreshed token lives that day,
        not a whole TTL; once the day is gone, refreshing it fails."""
        user_id = uuid.UUID(token_claims(session["access_token"])["sub"])
        maximum, day = user_settings.refresh_session_max_seconds, 86_400
        assert maximum - day > user_settings.refresh_token_ttl_seconds  # the TTL would outlive it
        await db.execute(
            "UPDATE refresh_tokens "
            "SET session_started_at = session_started_at - $2::int * interval '1 second' "
            "WHERE user_id = $1",
            user_id,
            maximum - day,
        )

        tokens = await refreshed(user_client, session["refresh_token"])
        assert day - 60 <= tokens["refresh_expires_in"] <= day
        again = await refreshed(user_client, tokens["refresh_token"])
        assert again["refresh_expires_in"] <= tokens["refresh_expires_in"]

        await db.execute(
            "UPDATE refresh_tokens SET session_started_at = session_started_at - interval '1 day' "
            "WHERE user_id = $1",
            user_id,
        )
        response = await refresh(user_client, again["refresh_token"])

        assert (response.status_code, response.json()) == (401, INVALID)

    @pytest.mark.parametrize("token", ["x", "not-a-refresh-token", "A" * 43])
    async def test_an_unknown_token_is_refused(
        self, user_client: httpx.AsyncClient, token: str
    ) -> None:
        response = await refresh(user_client, token)

        assert (response.status_code, response.json()) == (401, INVALID)


class TestLogout:
    async def test_ends_the_family(
        self, user_client: httpx.AsyncClient, tenant: str, session: dict[str, Any]
    ) -> None:
        other_session = await logged_in(user_client, tenant)
        second = await refreshed(user_client, session["refresh_token"])

        response = await logout(user_client, second["refresh_token"])

        assert response.status_code == 204
        assert response.content == b""
        for token in (second["refresh_token"], session["refresh_token"]):
            assert (await refresh(user_client, token)).json() == INVALID
        assert (await refresh(user_client, other_session["refresh_token"])).status_code == 200

    async def test_twice_is_fine(
        self, user_client: httpx.AsyncClient, session: dict[str, Any]
    ) -> None:
        first = await logout(user_client, session["refresh_token"])
        second = await logout(user_client, session["refresh_token"])

        assert (first.status_code, second.status_code) == (204, 204)
        assert (await refresh(user_client, session["refresh_token"])).status_code == 401

    @pytest.mark.parametrize("token", ["x", "not-a-refresh-token", "A" * 43])
    async def test_an_unknown_token_is_no_content_too(
        self, user_client: httpx.AsyncClient, token: str
    ) -> None:
        assert (await logout(user_client, token)).status_code == 204

    async def test_a_body_without_a_token_is_invalid(self, user_client: httpx.AsyncClient) -> None:
        assert (await user_client.post("/logout", json={})).status_code == 422


@pytest.fixture
async def campaign_client(
    database_url: str, amqp_url: str, user_client: httpx.AsyncClient
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_campaign_app(
        make_campaign_settings(database_url, amqp_url), jwks_client=user_client
    )
    async with app.router.lifespan_context(app):
        await wait_ready(app)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=CAMPAIGN_SERVICE_URL
        ) as client:
            yield client


class TestHousekeeping:
    async def test_tokens_expired_past_the_retention_go_and_their_sessions_keep_their_end(
        self,
        user_client: httpx.AsyncClient,
        user_settings: UserServiceSettings,
        tenant: str,
        db: asyncpg.Connection,
        start_user_service: Any,
    ) -> None:
        """With an hour's retention: a session's token expired two hours ago goes, one expired
        minutes ago stays. A session whose first token went still refreshes, and still ends
        its maximum after its login."""
        assert (await register(user_client, tenant)).status_code == 201
        gone, refreshed_once, lately = [await logged_in(user_client, tenant) for _ in range(3)]
        newest = await refreshed(user_client, refreshed_once["refresh_token"])
        expired = {
            "gone": (gone, "2 hours"),
            "rotated": (refreshed_once, "2 hours"),
            "lately": (lately, "10 minutes"),
        }
        for tokens, ago in expired.values():
            await db.execute(
                "UPDATE refresh_tokens SET expires_at = now() - $2::text::interval "
                "WHERE token_hash = $1",
                token_hash(tokens["refresh_token"]),
                ago,
            )
        # The session refreshed once started a day short of the maximum ago.
        maximum, day = user_settings.refresh_session_max_seconds, 86_400
        await db.execute(
            "UPDATE refresh_tokens "
            "SET session_started_at = session_started_at - $2::int * interval '1 second' "
            "WHERE token_hash = $1",
            token_hash(newest["refresh_token"]),
            maximum - day,
        )

        async def present() -> set[str]:
            found = set()
            for name, (tokens, _) in {**expired, "newest": (newest, "")}.items():
                digest = token_hash(tokens["refresh_token"])
                if await db.fetchval("SELECT 1 FROM refresh_tokens WHERE token_hash = $1", digest):
                    found.add(name)
            return found

        async with start_user_service(
            refresh_token_retention_seconds=3600, housekeeping_interval_seconds=1
        ):
            left = await eventually(
                present, until=lambda names: "gone" not in names, what="expired tokens deleted"
            )

        assert left == {"lately", "newest"}
        again = await refreshed(user_client, newest["refresh_token"])
        assert day - 60 <= again["refresh_expires_in"] <= day


class TestCampaignServiceTakesEveryRole:
    async def test_access_tokens_of_every_role_and_after_a_refresh(
        self, user_client: httpx.AsyncClient, campaign_client: httpx.AsyncClient, tenant: str
    ) -> None:
        owner = await owner_headers(user_client, tenant)
        emails = {"owner": "ada@example.com"}
        for role in ("admin", "member"):
            emails[role] = f"{role}@example.com"
            await invite_and_register(user_client, owner, tenant, emails[role], role)

        created = []
        for role, email in emails.items():
            tokens = await logged_in(user_client, tenant, email)
            again = await refreshed(user_client, tokens["refresh_token"])
            for access_token in (tokens["access_token"], again["access_token"]):
                assert token_claims(access_token)["role"] == role
                response = await campaign_client.post(
                    "/campaigns", json={"name": f"by {role}"}, headers=bearer(access_token)
                )
                assert response.status_code == 201, (role, response.text)
                assert response.json()["tenant_id"] == tenant
                created.append(response.json()["id"])

        listed = await campaign_client.get("/campaigns?limit=50", headers=owner)
        assert listed.status_code == 200
        assert sorted(item["id"] for item in listed.json()["items"]) == sorted(created)
