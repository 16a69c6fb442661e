from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from joserfc.jwk import OKPKey
from pydantic import SecretStr

from shared.settings import Environment
from user_service.settings import UserServiceSettings

USER_SERVICE_URL = "http://user-service"
JWKS_URL = f"{USER_SERVICE_URL}/.well-known/jwks.json"
PASSWORD = "correct horse battery staple"


def new_private_key_pem() -> str:
    return OKPKey.generate_key("Ed25519").as_pem(private=True).decode()


def make_user_settings(database_url: str, **overrides: Any) -> UserServiceSettings:
    values: dict[str, Any] = {
        "environment": Environment.TEST,
        "database_url": database_url,
        "jwt_private_key": SecretStr(new_private_key_pem()),
        **overrides,
    }
    return UserServiceSettings(_env_file=None, **values)


# A client's view of accounts: registration, invitations, logins, tokens.


def bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


def token_claims(access_token: str) -> dict[str, Any]:
    """The payload of a JWT as anyone holding it can read it (no verification)."""
    payload = access_token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


async def register(
    client: httpx.AsyncClient,
    tenant: str,
    email: str = "ada@example.com",
    *,
    password: str = PASSWORD,
    invitation: str | None = None,
) -> httpx.Response:
    body: dict[str, str] = {"tenant_id": tenant, "email": email, "password": password}
    if invitation is not None:
        body["invitation"] = invitation
    return await client.post("/register", json=body)


async def login(
    client: httpx.AsyncClient, tenant: str, email: str = "ada@example.com", password: str = PASSWORD
) -> httpx.Response:
    return await client.post(
        "/login", json={"tenant_id": tenant, "email": email, "password": password}
    )


async def logged_in(
    client: httpx.AsyncClient, tenant: str, email: str = "ada@example.com"
) -> dict[str, Any]:
    """The body of a successful login: access and refresh tokens."""
    response = await login(client, tenant, email)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


async def headers_for(
    client: httpx.AsyncClient, tenant: str, email: str = "ada@example.com"
) -> dict[str, str]:
    """Log in and return the Authorization header of the access token."""
    return bearer((await logged_in(client, tenant, email))["access_token"])


async def owner_headers(
    client: httpx.AsyncClient, tenant: str, email: str = "ada@example.com"
) -> dict[str, str]:
    """Create ``tenant`` (its first user is its owner) and log that owner in."""
    response = await register(client, tenant, email)
    assert response.status_code == 201, response.text
    return await headers_for(client, tenant, email)


async def invite(
    client: httpx.AsyncClient, headers: dict[str, str], email: str, role: str = "member"
) -> dict[str, Any]:
    """An invitation (with its one-time token) issued by the caller of ``headers``."""
    response = await client.post(
        "/invitations", json={"email": email, "role": role}, headers=headers
    )
    assert response.status_code == 201, response.text
    invitation: dict[str, Any] = response.json()
    return invitation


async def invite_and_register(
    user_client: httpx.AsyncClient,
    owner_headers: dict[str, str],
    tenant: str,
    email: str,
    role: str = "member",
) -> dict[str, Any]:
    """Another user in an existing tenant, as the platform lets one in: invited, then
    registered with the invitation. Returns the registered user."""
    invitation = await invite(user_client, owner_headers, email, role)
    response = await register(user_client, tenant, email, invitation=invitation["token"])
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


def client_of(app: FastAPI, address: str = "127.0.0.1") -> httpx.AsyncClient:
    """A client of an (already started) user_service app, calling from ``address``."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(address, 40000)), base_url=USER_SERVICE_URL
    )


@asynccontextmanager
async def clients_from_new_addresses(
    app: FastAPI, count: int
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` clients of the app, each calling from an address of its own: for races, which
    one address could not run (at most a few of its password hashes run at once)."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(client_of(app, new_address())) for _ in range(count)]


def new_address() -> str:
    """A client address of the test's own: login throttling counts per address."""
    return str(ipaddress.IPv4Address(0x0A000000 + secrets.randbelow(0xFFFFFF)))


@asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[FastAPI]:
    async with app.router.lifespan_context(app):
        yield app
