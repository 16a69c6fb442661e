"""Managing a tenant: its members and their roles, its invitations; who may do what."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from tests.support.users import (
    headers_for,
    invite,
    invite_and_register,
    logged_in,
    login,
    owner_headers,
    token_claims,
)

OWNER, ADMIN, MEMBER = "ada@example.com", "grace@example.com", "bob@example.com"


@dataclass
class Team:
    client: httpx.AsyncClient
    tenant: str
    ids: dict[str, str]  # by role
    headers: dict[str, dict[str, str]]  # by role
    other_owner: dict[str, str]  # the owner of another tenant
    other_owner_id: str


@pytest.fixture
async def team(user_client: httpx.AsyncClient, tenant: str, other_tenant: str) -> Team:
    owner = await owner_headers(user_client, tenant, OWNER)
    ids = {"owner": token_claims(owner["Authorization"].split()[1])["sub"]}
    headers = {"owner": owner}
    for role, email in (("admin", ADMIN), ("member", MEMBER)):
        user = await invite_and_register(user_client, owner, tenant, email, role)
        ids[role] = user["id"]
        headers[role] = await headers_for(user_client, tenant, email)
    other_owner = await owner_headers(user_client, other_tenant, OWNER)
    other_owner_id = token_claims(other_owner["Authorization"].split()[1])["sub"]
    return Team(user_client, tenant, ids, headers, other_owner, other_owner_id)


async def roles(team: Team) -> dict[str, str]:
    response = await team.client.get("/members", headers=team.headers["owner"])
    assert response.status_code == 200, response.text
    return {member["email"]: member["role"] for member in response.json()}


async def roles_any(team: Team) -> dict[str, str]:
    """The members as whichever of the team's first two users can still read them."""
    for caller in ("owner", "admin"):
        response = await team.client.get("/members", headers=team.headers[caller])
        if response.status_code == 200:
            return {member["email"]: member["role"] for member in response.json()}
    raise AssertionError("neither owner can read the members")


async def patch(team: Team, caller: str, member_id: str, role: str) -> httpx.Response:
    return await team.client.patch(
        f"/members/{member_id}", json={"role": role}, headers=team.headers[caller]
    )


async def remove(team: Team, caller: str, member_id: str) -> httpx.Response:
    return await team.client.delete(f"/members/{member_id}", headers=team.headers[caller])


class TestListMembers:
    @pytest.mark.parametrize("caller", ["owner", "admin", "member"])
    async def test_every_role_sees_its_tenant_only(self, team: Team, caller: str) -> None:
        response = await team.client.get("/members", headers=team.headers[caller])

        assert response.status_code == 200, response.text
        members = response.json()
        assert all(set(member) == {"id", "email", "role", "created_at"} for member in members)
        assert {member["id"]: (member["email"], member["role"]) for member in members} == {
            team.ids["owner"]: (OWNER, "owner"),
            team.ids["admin"]: (ADMIN, "admin"),
            team.ids["member"]: (MEMBER, "member"),
        }

    async def test_without_a_token_is_unauthorized(self, user_client: httpx.AsyncClient) -> None:
        assert (await user_client.get("/members")).status_code == 401


class TestInvitations:
    @pytest.mark.parametrize("caller", ["owner", "admin"])
    async def test_create_list_and_delete(self, team: Team, caller: str) -> None:
        headers = team.headers[caller]

        created = await team.client.post(
            "/invitations", json={"email": "Carol@Example.com", "role": "admin"}, headers=headers
        )
        listed = await team.client.get("/invitations", headers=headers)

        assert created.status_code == 201, created.text
        invitation = created.json()
        assert set(invitation) == {"id", "email", "role", "token", "expires_at"}
        assert (invitation["email"], invitation["role"]) == ("carol@example.com", "admin")
        expires_at = datetime.fromisoformat(invitation["expires_at"])
        assert abs(expires_at - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=1)
        assert listed.status_code == 200, listed.text
        [pending] = [item for item in listed.json() if item["id"] == invitation["id"]]
        assert set(pending) == {"id", "email", "role", "created_at", "expires_at"}
        assert invitation["token"] not in listed.text

        deleted = await team.client.delete(f"/invitations/{invitation['id']}", headers=headers)

        assert deleted.status_code == 204
        after = await team.client.get("/invitations", headers=headers)
        assert invitation["id"] not in [item["id"] for item in after.json()]

    async def test_an_expired_invitation_is_not_pending(
        self, team: Team, db: asyncpg.Connection
    ) -> None:
        invitation = await invite(team.client, team.headers["owner"], "carol@example.com")
        await db.execute(
            "UPDATE invitations SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(invitation["id"]),
        )

        listed = await team.client.get("/invitations", headers=team.headers["owner"])

        assert invitation["id"] not in [item["id"] for item in listed.json()]

    async def test_a_member_may_not_touch_invitations(self, team: Team) -> None:
        invitation = await invite(team.client, team.headers["owner"], "carol@example.com")
        headers = team.headers["member"]

        created = await team.client.post(
            "/invitations", json={"email": "dan@example.com", "role": "member"}, headers=headers
        )
        listed = await team.client.get("/invitations", headers=headers)
        deleted = await team.client.delete(f"/invitations/{invitation['id']}", headers=headers)

        assert (created.status_code, listed.status_code, deleted.status_code) == (403, 403, 403)
        still = await team.client.get("/invitations", headers=team.headers["owner"])
        assert invitation["id"] in [item["id"] for item in still.json()]

    async def test_another_tenants_invitation_is_not_found(self, team: Team) -> None:
        theirs = await invite(team.client, team.other_owner, "carol@example.com")

        response = await team.client.delete(
            f"/invitations/{theirs['id']}", headers=team.headers["owner"]
        )
        unknown = await team.client.delete(
            f"/invitations/{uuid.uuid4()}", headers=team.headers["owner"]
        )

        assert (response.status_code, unknown.status_code) == (404, 404)
        listed = await team.client.get("/invitations", headers=team.other_owner)
        assert theirs["id"] in [item["id"] for item in listed.json()]
        mine = await team.client.get("/invitations", headers=team.headers["owner"])
        assert theirs["id"] not in [item["id"] for item in mine.json()]

    async def test_inviting_a_member_is_a_conflict(self, team: Team) -> None:
        response = await team.client.post(
            "/invitations", json={"email": MEMBER, "role": "admin"}, headers=team.headers["admin"]
        )

        assert response.status_code == 409, response.text

    async def test_an_invitation_cannot_grant_owner(self, team: Team) -> None:
        response = await team.client.post(
            "/invitations",
            json={"email": "carol@example.com", "role": "owner"},
            headers=team.headers["owner"],
        )

        assert response.status_code == 422


class TestChangeRole:
    @pytest.mark.parametrize(
        ("caller", "target", "role"),
        [
            ("owner", "member", "admin"),
            ("owner", "admin", "member"),
            ("owner", "member", "owner"),
            ("admin", "member", "admin"),
        ],
    )
    async def test_allowed(self, team: Team, caller: str, target: str, role: str) -> None:
        response = await patch(team, caller, team.ids[target], role)

        assert response.status_code == 200, response.text
        assert response.json()["id"] == team.ids[target]
        assert response.json()["role"] == role
        assert set(response.json()) == {"id", "email", "role", "created_at"}
        email = response.json()["email"]
        assert (await roles(team))[email] == role
        tokens = await logged_in(team.client, team.tenant, email)
        assert token_claims(tokens["access_token"])["role"] == role

    async def test_an_admin_may_demote_another_admin(self, team: Team) -> None:
        await invite_and_register(
            team.client, team.headers["owner"], team.tenant, "carol@example.com", "admin"
        )
        carol = next(
            member
            for member in (await team.client.get("/members", headers=team.headers["owner"])).json()
            if member["email"] == "carol@example.com"
        )

        response = await patch(team, "admin", carol["id"], "member")

        assert response.status_code == 200, response.text
        assert (await roles(team))["carol@example.com"] == "member"

    @pytest.mark.parametrize(
        ("caller", "target", "role"),
        [
            ("admin", "owner", "member"),
            ("admin", "owner", "admin"),
            ("admin", "member", "owner"),
            ("admin", "admin", "owner"),
            ("member", "member", "admin"),
            ("member", "admin", "member"),
        ],
    )
    async def test_forbidden(self, team: Team, caller: str, target: str, role: str) -> None:
        before = await roles(team)

        response = await patch(team, caller, team.ids[target], role)

        assert response.status_code == 403, response.text
        assert await roles(team) == before

    async def test_the_last_owner_cannot_be_demoted(self, team: Team) -> None:
        response = await patch(team, "owner", team.ids["owner"], "admin")

        assert response.status_code == 409, response.text
        assert (await roles(team))[OWNER] == "owner"

    async def test_one_of_two_owners_can_be_demoted(self, team: Team) -> None:
        assert (await patch(team, "owner", team.ids["admin"], "owner")).status_code == 200

        response = await patch(team, "admin", team.ids["owner"], "member")  # an owner now

        assert response.status_code == 200, response.text
        assert (await roles(team))[OWNER] == "member"

    @pytest.mark.parametrize("change", ["demote", "remove"])
    async def test_two_owners_removing_each_other_at_once_leave_one(
        self, team: Team, change: str
    ) -> None:
        assert (await patch(team, "owner", team.ids["admin"], "owner")).status_code == 200

        async def act(caller: str, target: str) -> httpx.Response:
            if change == "demote":
                return await patch(team, caller, team.ids[target], "member")
            return await remove(team, caller, team.ids[target])

        responses = await asyncio.gather(act("owner", "admin"), act("admin", "owner"))

        statuses = sorted(response.status_code for response in responses)
        assert statuses[0] in (200, 204), statuses
        assert statuses[1] in (403, 409), statuses  # the last owner, or no longer an owner
        assert list((await roles_any(team)).values()).count("owner") == 1

    async def test_a_refresh_carries_the_new_role(self, team: Team) -> None:
        tokens = await logged_in(team.client, team.tenant, MEMBER)
        assert (await patch(team, "owner", team.ids["member"], "admin")).status_code == 200

        response = await team.client.post(
            "/token/refresh", json={"refresh_token": tokens["refresh_token"]}
        )

        assert response.status_code == 200, response.text
        assert token_claims(response.json()["access_token"])["role"] == "admin"

    async def test_the_role_is_read_from_the_database_not_the_token(self, team: Team) -> None:
        """A demoted admin's access token still says admin; it no longer lets them invite."""
        admin_headers = team.headers["admin"]
        assert (await patch(team, "owner", team.ids["admin"], "member")).status_code == 200

        response = await team.client.post(
            "/invitations",
            json={"email": "carol@example.com", "role": "member"},
            headers=admin_headers,
        )

        assert response.status_code == 403, response.text

    @pytest.mark.parametrize("caller", ["owner", "admin"])
    async def test_another_tenants_member_is_not_found(self, team: Team, caller: str) -> None:
        theirs = await patch(team, caller, team.other_owner_id, "member")
        unknown = await patch(team, caller, str(uuid.uuid4()), "member")

        assert (theirs.status_code, unknown.status_code) == (404, 404)
        listed = await team.client.get("/members", headers=team.other_owner)
        assert [member["role"] for member in listed.json()] == ["owner"]


class TestRemoveMember:
    @pytest.mark.parametrize(
        ("caller", "target"), [("owner", "member"), ("owner", "admin"), ("admin", "member")]
    )
    async def test_removed_member_loses_access(self, team: Team, caller: str, target: str) -> None:
        email = {"admin": ADMIN, "member": MEMBER}[target]
        tokens = await logged_in(team.client, team.tenant, email)

        response = await remove(team, caller, team.ids[target])

        assert response.status_code == 204, response.text
        assert email not in await roles(team)
        refreshed = await team.client.post(
            "/token/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert refreshed.status_code == 401
        assert refreshed.json() == {"detail": "Invalid refresh token"}
        assert (await login(team.client, team.tenant, email)).status_code == 401
        members = await team.client.get("/members", headers=team.headers[target])
        assert members.status_code == 401  # an access token of a removed account

    @pytest.mark.parametrize(
        ("caller", "target"), [("admin", "owner"), ("member", "member"), ("member", "admin")]
    )
    async def test_forbidden(self, team: Team, caller: str, target: str) -> None:
        response = await remove(team, caller, team.ids[target])

        assert response.status_code == 403, response.text
        assert len(await roles(team)) == 3

    async def test_the_last_owner_cannot_be_removed(self, team: Team) -> None:
        response = await remove(team, "owner", team.ids["owner"])

        assert response.status_code == 409, response.text
        assert (await roles(team))[OWNER] == "owner"

    @pytest.mark.parametrize("caller", ["owner", "admin"])
    async def test_another_tenants_member_is_not_found(self, team: Team, caller: str) -> None:
        theirs = await remove(team, caller, team.other_owner_id)
        unknown = await remove(team, caller, str(uuid.uuid4()))

        assert (theirs.status_code, unknown.status_code) == (404, 404)
        listed = await team.client.get("/members", headers=team.other_owner)
        assert listed.status_code == 200
        assert [member["id"] for member in listed.json()] == [team.other_owner_id]
