"""Accounts through the gateway: invitations, refresh and logout at /api/users/..., in front of
the real user_service over TCP."""

from __future__ import annotations

from gateway.settings import RouteConfig
from tests.gateway.test_gateway import gateway
from tests.support.servers import serve
from tests.support.users import PASSWORD, bearer, make_user_settings
from user_service.app import create_app as create_user_app


class TestAccountsThroughTheGateway:
    async def test_invite_join_refresh_and_logout(self, database_url: str, tenant: str) -> None:
        user_app = create_user_app(make_user_settings(database_url))
        async with (
            serve(user_app) as user_url,
            gateway([RouteConfig(name="user_service", prefix="/api/users", upstream=user_url)]) as (
                client,
                _,
            ),
        ):
            ada = {"tenant_id": tenant, "email": "ada@example.com", "password": PASSWORD}
            bob = {**ada, "email": "bob@example.com"}
            assert (await client.post("/api/users/register", json=ada)).status_code == 201
            owner = bearer((await client.post("/api/users/login", json=ada)).json()["access_token"])
            invited = await client.post(
                "/api/users/invitations",
                json={"email": bob["email"], "role": "admin"},
                headers=owner,
            )
            refused = await client.post("/api/users/register", json=bob)
            joined = await client.post(
                "/api/users/register", json={**bob, "invitation": invited.json()["token"]}
            )
            members = await client.get("/api/users/members", headers=owner)
            session = (await client.post("/api/users/login", json=bob)).json()
            rotated = await client.post(
                "/api/users/token/refresh", json={"refresh_token": session["refresh_token"]}
            )
            reused = await client.post(
                "/api/users/token/refresh", json={"refresh_token": session["refresh_token"]}
            )
            fresh = (await client.post("/api/users/login", json=bob)).json()
            logout = await client.post(
                "/api/users/logout", json={"refresh_token": fresh["refresh_token"]}
            )
            after_logout = await client.post(
                "/api/users/token/refresh", json={"refresh_token": fresh["refresh_token"]}
            )

        assert invited.status_code == 201, invited.text
        assert refused.status_code == 403
        assert (joined.status_code, joined.json()["role"]) == (201, "admin")
        assert {m["email"]: m["role"] for m in members.json()} == {
            "ada@example.com": "owner",
            "bob@example.com": "admin",
        }
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["refresh_token"] != session["refresh_token"]
        assert reused.status_code == 401
        assert logout.status_code == 204
        assert after_logout.status_code == 401
