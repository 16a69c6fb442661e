"""campaign_service's HTTP API: tokens, validation, tenant isolation, pagination, the outbox row."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey

from campaign_service.app import create_app as create_campaign_app
from shared.models.campaigns import CAMPAIGN_DESCRIPTION_MAX_LENGTH, CAMPAIGN_NAME_MAX_LENGTH
from shared.tokens import KeyConfigurationError
from tests.pipeline.conftest import make_campaign_settings
from tests.support.bodies import NOT_JSON
from tests.support.campaigns import create_campaign
from tests.user_service.test_tokens import b64, unb64
from user_service.settings import UserServiceSettings
from user_service.tokens.keys import load_signing_keys


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def crafted_cursor(raw: str) -> str:
    """A cursor made by hand rather than taken from a page (cursors are opaque, not signed)."""
    return base64.urlsafe_b64encode(raw.encode()).decode()


class TestAuthentication:
    async def test_missing_token(self, campaign_client: httpx.AsyncClient) -> None:
        for response in (
            await campaign_client.get("/campaigns"),
            await campaign_client.post("/campaigns", json={"name": "x"}),
            await campaign_client.get("/campaigns", headers={"Authorization": "Basic YTpi"}),
        ):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json() == {"detail": "Not authenticated"}

    @pytest.mark.parametrize(
        "kind",
        [
            "expired",
            "tampered",
            "foreign-key",
            "garbage",
            "audience",
            # A protected header that is JSON but not an object (joserfc lets it through).
            "header-string",
            "header-list",
            "header-string-b64",
        ],
    )
    async def test_bad_tokens(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        user_settings: UserServiceSettings,
        kind: str,
    ) -> None:
        token = headers["Authorization"].removeprefix("Bearer ")
        head, payload, signature = token.split(".")
        claims = unb64(payload)
        keys = load_signing_keys(user_settings)
        if kind == "expired":
            claims["exp"] = int(time.time()) - 1
            token = jwt.encode(unb64(head), claims, keys.signing_key, algorithms=["Ed25519"])
        elif kind == "audience":
            claims["aud"] = "someone-else"
            token = jwt.encode(unb64(head), claims, keys.signing_key, algorithms=["Ed25519"])
        elif kind == "tampered":
            claims["tenant_id"] = "another-tenant"
            token = f"{head}.{b64(json.dumps(claims).encode())}.{signature}"
        elif kind == "foreign-key":
            foreign = OKPKey.generate_key("Ed25519")
            token = jwt.encode(
                {"alg": "Ed25519", "kid": foreign.thumbprint()},
                claims,
                foreign,
                algorithms=["Ed25519"],
            )
        elif kind.startswith("header-"):
            not_an_object = {"header-string": "alg", "header-list": ["alg"]}.get(kind, "algb64")
            token = f"{b64(json.dumps(not_an_object).encode())}.{payload}.{signature}"
        else:
            token = "not.a.token"

        response = await campaign_client.get("/campaigns", headers=bearer(token))

        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert response.json() == {"detail": "Invalid or expired token"}


class TestConfiguredKeys:
    async def test_public_keys_from_configuration_instead_of_the_jwks(
        self,
        database_url: str,
        amqp_url: str,
        user_settings: UserServiceSettings,
        headers: dict[str, str],
    ) -> None:
        current = load_signing_keys(user_settings).signing_key.as_pem(private=False).decode()
        retired, foreign = OKPKey.generate_key("Ed25519"), OKPKey.generate_key("Ed25519")
        claims = unb64(headers["Authorization"].split(".")[1])

        def signed_by(key: OKPKey) -> dict[str, str]:
            header = {"alg": "Ed25519", "kid": key.thumbprint()}
            return bearer(jwt.encode(header, claims, key, algorithms=["Ed25519"]))

        settings = make_campaign_settings(
            database_url,
            amqp_url,
            jwt_jwks_url="http://127.0.0.1:9/unreachable",  # never asked
            jwt_public_keys=retired.as_pem(private=False).decode() + current,
        )
        app = create_campaign_app(settings)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as c,
        ):
            statuses = [
                (await c.get("/campaigns", headers=each)).status_code
                for each in (headers, signed_by(retired), signed_by(foreign))
            ]

        assert statuses == [200, 200, 401]

    @pytest.mark.parametrize(
        "configured",
        [
            "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n",
            # An EC P-256 key: a key, but not one tokens are signed with.
            ECKey.generate_key("P-256").as_pem(private=False).decode(),
            # A key without its PEM armour, and a second block cut short.
            "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=",
            OKPKey.generate_key("Ed25519").as_pem(private=False).decode()
            + "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA",
        ],
    )
    async def test_a_key_that_cannot_be_used_stops_the_start(
        self, database_url: str, amqp_url: str, configured: str
    ) -> None:
        app = create_campaign_app(
            make_campaign_settings(database_url, amqp_url, jwt_public_keys=configured)
        )

        with pytest.raises(KeyConfigurationError, match="JWT_PUBLIC_KEYS"):
            async with app.router.lifespan_context(app):
                pass


class TestCreateCampaign:
    async def test_created(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        tenant: str,
        db: asyncpg.Connection,
    ) -> None:
        response = await campaign_client.post(
            "/campaigns", json={"name": "  Spring sale ", "description": "10% off"}, headers=headers
        )

        assert response.status_code == 201, response.text
        campaign = response.json()
        assert set(campaign) == {"id", "tenant_id", "name", "description", "created_at"}
        assert campaign["tenant_id"] == tenant
        assert campaign["name"] == "Spring sale"
        assert campaign["description"] == "10% off"
        stored = await db.fetchrow(
            "SELECT * FROM campaigns WHERE id = $1", uuid.UUID(campaign["id"])
        )
        assert stored is not None
        assert stored["tenant_id"] == tenant

    async def test_description_is_optional(
        self, campaign_client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        campaign = await create_campaign(campaign_client, headers, "No description")

        assert campaign["description"] is None

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"name": ""}, "name"),
            ({"name": "   "}, "name"),
            ({"name": "x" * (CAMPAIGN_NAME_MAX_LENGTH + 1)}, "name"),
            (
                {"name": "ok", "description": "x" * (CAMPAIGN_DESCRIPTION_MAX_LENGTH + 1)},
                "description",
            ),
            ({"name": 42}, "name"),
            ({"name": ["a"]}, "name"),
            ({"name": "ok", "description": 7}, "description"),
            # PostgreSQL text cannot store NUL: refused as input, never a 500.
            ({"name": "nul\u0000inside"}, "name"),
            ({"name": "ok", "description": "nul\u0000inside"}, "description"),
            ({"name": "ok", "tenant_id": "someone-else"}, "tenant_id"),
            ({"name": "ok", "status": "done"}, "status"),
            ({}, "name"),
        ],
    )
    async def test_invalid_input_names_the_field(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        body: dict[str, Any],
        field: str,
    ) -> None:
        response = await campaign_client.post("/campaigns", json=body, headers=headers)

        assert response.status_code == 422, response.text
        assert ["body", field] in [error["loc"] for error in response.json()["detail"]]

    async def test_longest_values_are_accepted(
        self, campaign_client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        campaign = await create_campaign(
            campaign_client,
            headers,
            "n" * CAMPAIGN_NAME_MAX_LENGTH,
            description="d" * CAMPAIGN_DESCRIPTION_MAX_LENGTH,
        )

        assert len(campaign["name"]) == CAMPAIGN_NAME_MAX_LENGTH

    @pytest.mark.parametrize("content", NOT_JSON)
    async def test_non_json_body(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        db: asyncpg.Connection,
        tenant: str,
        content: bytes,
    ) -> None:
        response = await campaign_client.post(
            "/campaigns",
            content=content,
            headers={**headers, "content-type": "application/json"},
        )

        assert response.status_code == 422
        assert [error["loc"][0] for error in response.json()["detail"]] == ["body"]
        assert await db.fetchval("SELECT count(*) FROM campaigns WHERE tenant_id = $1", tenant) == 0


class TestTenantIsolation:
    async def test_each_tenant_sees_only_its_campaigns(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        other_headers: dict[str, str],
    ) -> None:
        mine = await create_campaign(campaign_client, headers, "mine")
        theirs = await create_campaign(campaign_client, other_headers, "theirs")

        my_list = (await campaign_client.get("/campaigns", headers=headers)).json()
        their_list = (await campaign_client.get("/campaigns", headers=other_headers)).json()

        assert [item["id"] for item in my_list["items"]] == [mine["id"]]
        assert [item["id"] for item in their_list["items"]] == [theirs["id"]]

    @pytest.mark.parametrize("suffix", ["", "/jobs"])
    async def test_another_tenants_campaign_is_not_found(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        other_headers: dict[str, str],
        suffix: str,
    ) -> None:
        theirs = await create_campaign(campaign_client, other_headers, "theirs")

        response = await campaign_client.get(f"/campaigns/{theirs['id']}{suffix}", headers=headers)
        unknown = await campaign_client.get(f"/campaigns/{uuid.uuid4()}{suffix}", headers=headers)
        own = await campaign_client.get(f"/campaigns/{theirs['id']}{suffix}", headers=other_headers)

        assert response.status_code == 404
        assert response.json() == unknown.json() == {"detail": "Campaign not found"}
        assert own.status_code == 200

    async def test_malformed_id(
        self, campaign_client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await campaign_client.get("/campaigns/not-a-uuid", headers=headers)

        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["path", "campaign_id"]


class TestListCampaigns:
    async def test_newest_first_in_pages(
        self, campaign_client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        created = [await create_campaign(campaign_client, headers, f"c{i}") for i in range(5)]
        newest_first = [campaign["id"] for campaign in reversed(created)]

        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, str | int] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await campaign_client.get("/campaigns", params=params, headers=headers)).json()
            seen += [item["id"] for item in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break

        assert seen == newest_first
        assert pages == 3

    async def test_empty_tenant(
        self, campaign_client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        page = (await campaign_client.get("/campaigns", headers=headers)).json()

        assert page == {"items": [], "next_cursor": None}

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"limit": 0}, "limit"),
            ({"limit": 101}, "limit"),
            ({"cursor": "%%%"}, "cursor"),
            ({"cursor": crafted_cursor(f"2026-01-01T00:00:00|{uuid.uuid4()}")}, "cursor"),
            ({"cursor": crafted_cursor(f"9999-12-31T23:00:00-05:00|{uuid.uuid4()}")}, "cursor"),
            ({"cursor": crafted_cursor("2026-01-01T00:00:00+00:00|not-a-uuid")}, "cursor"),
            ({"cursor": crafted_cursor("2026-01-01T00:00:00+00:00")}, "cursor"),
        ],
    )
    async def test_invalid_paging(
        self,
        campaign_client: httpx.AsyncClient,
        headers: dict[str, str],
        params: dict[str, Any],
        field: str,
    ) -> None:
        response = await campaign_client.get("/campaigns", params=params, headers=headers)

        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", field]


class TestServiceEndpoints:
    async def test_ready_health_docs(self, campaign_client: httpx.AsyncClient) -> None:
        ready = await campaign_client.get("/ready")
        schema = (await campaign_client.get("/openapi.json")).json()

        assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}
        assert (await campaign_client.get("/health")).status_code == 200
        assert (await campaign_client.get("/docs")).status_code == 200
        assert {"/campaigns", "/campaigns/{campaign_id}", "/campaigns/{campaign_id}/jobs"} <= set(
            schema["paths"]
        )
