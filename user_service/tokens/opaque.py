"""Opaque tokens (refresh tokens, invitations): random, shown once, stored as a hash only."""

from __future__ import annotations

import hashlib
import secrets


def new_token() -> tuple[str, bytes]:
    """A fresh token (32 random bytes, URL-safe) and the hash to store in its place."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> bytes:
    # A fast hash suffices: the token has 256 bits of entropy, nothing to guess by brute force.
    return hashlib.sha256(token.encode()).digest()
