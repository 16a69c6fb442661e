from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg


async def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` and return its SQLAlchemy (asyncpg) URL."""
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg", path=f"/{name}"))


async def drop_database(admin_url: str, name: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()
