"""A client's view of the platform: log in, create campaigns, read their job rows."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.polling import eventually
from tests.support.users import PASSWORD

Jobs = list[dict[str, Any]]


async def login_headers(
    user_client: httpx.AsyncClient, tenant: str, email: str = "ada@example.com"
) -> dict[str, str]:
    credentials = {"tenant_id": tenant, "email": email, "password": PASSWORD}
    await user_client.post("/register", json=credentials)
    response = await user_client.post("/login", json=credentials)
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def create_campaign(
    client: httpx.AsyncClient, headers: dict[str, str], name: str, **fields: Any
) -> dict[str, Any]:
    response = await client.post("/campaigns", json={"name": name, **fields}, headers=headers)
    assert response.status_code == 201, response.text
    campaign: dict[str, Any] = response.json()
    return campaign


async def jobs_of(client: httpx.AsyncClient, headers: dict[str, str], campaign_id: str) -> Jobs:
    response = await client.get(f"/campaigns/{campaign_id}/jobs", headers=headers)
    assert response.status_code == 200, response.text
    items: Jobs = response.json()["items"]
    return items


async def wait_for_jobs(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    campaign_id: str,
    *,
    final: str = "success",
    timeout: float = 10.0,
) -> Jobs:
    """The campaign's rows once one with status ``final`` is among them."""

    async def rows() -> Jobs:
        return await jobs_of(client, headers, campaign_id)

    return await eventually(
        rows,
        until=lambda items: any(item["status"] == final for item in items),
        timeout=timeout,
        what=f"a {final} row for campaign {campaign_id}",
    )


def steps(jobs: Jobs) -> list[tuple[str, int]]:
    return [(job["status"], job["attempts"]) for job in jobs]
