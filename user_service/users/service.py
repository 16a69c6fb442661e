from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import User
from user_service.tokens.issuer import IssuedToken, TokenIssuer
from user_service.users.exceptions import EmailAlreadyRegistered, InvalidCredentials
from user_service.users.passwords import PasswordHasher, UnusableHash
from user_service.users.repository import UserRepository
from user_service.users.schemas import LoginRequest, RegisterRequest

logger = logging.getLogger(__name__)


async def register(
    *, session: AsyncSession, passwords: PasswordHasher, data: RegisterRequest
) -> User:
    users = UserRepository(session, tenant_id=data.tenant_id)
    hashed = await passwords.hash(data.password)
    user = await users.create(email=data.email, hashed_password=hashed)
    if user is None:
        raise EmailAlreadyRegistered()
    logger.info("user registered", extra={"tenant_id": user.tenant_id, "user_id": str(user.id)})
    return user


async def login(
    *,
    session: AsyncSession,
    passwords: PasswordHasher,
    tokens: TokenIssuer,
    data: LoginRequest,
) -> IssuedToken:
    users = UserRepository(session, tenant_id=data.tenant_id)
    user = await users.get_by_email(data.email)
    found = (user.id, user.hashed_password) if user is not None else None
    # End the read before waiting for a hashing thread: a login storm must not hold every
    # pooled connection while it queues for the CPU. (A hash upgrade below starts anew.)
    await session.rollback()
    if found is None:
        await passwords.verify_unknown_user(data.password)
        raise InvalidCredentials()
    user_id, hashed_password = found
    try:
        valid, new_hash = await passwords.verify_and_update(data.password, hashed_password)
    except UnusableHash:
        logger.error(
            "stored password hash is in no known format; login refused",
            extra={"tenant_id": data.tenant_id, "user_id": str(user_id)},
        )
        raise InvalidCredentials() from None
    if not valid:
        raise InvalidCredentials()
    if new_hash is not None:
        await users.set_password_hash(user_id, new_hash)
        logger.info(
            "password hash upgraded",
            extra={"tenant_id": data.tenant_id, "user_id": str(user_id)},
        )
    return tokens.issue(user_id=user_id, tenant_id=data.tenant_id)
