from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Role, User
from user_service.members.repository import InvitationRepository
from user_service.sessions import service as sessions
from user_service.sessions.service import TokenPair
from user_service.tokens.issuer import TokenIssuer
from user_service.tokens.opaque import token_hash
from user_service.users.exceptions import (
    EmailAlreadyRegistered,
    InvalidCredentials,
    InvitationRequired,
)
from user_service.users.passwords import PasswordHasher, UnusableHash
from user_service.users.repository import UserRepository
from user_service.users.schemas import LoginRequest, RegisterRequest
from user_service.users.throttle import LoginThrottle

logger = logging.getLogger(__name__)


async def register(
    *,
    session: AsyncSession,
    passwords: PasswordHasher,
    throttle: LoginThrottle,
    data: RegisterRequest,
    address: str,
) -> User:
    """Create the tenant with the caller as its owner, or join it with an invitation."""
    users = UserRepository(session, tenant_id=data.tenant_id)
    # A registration costs a password hash, as a login does: bounded per address the same way.
    with throttle.hashing(tenant_id=data.tenant_id, address=address):
        await throttle.admit_registration(tenant_id=data.tenant_id, address=address)
        hashed = await passwords.hash(data.password)
    if data.invitation is None:
        if not await users.create_tenant():
            raise InvitationRequired()
        role = Role.OWNER
    else:
        invitations = InvitationRepository(session, tenant_id=data.tenant_id)
        invitation = await invitations.claim(
            email=data.email, token_hash=token_hash(data.invitation)
        )
        if invitation is None:
            raise InvitationRequired()
        role = Role(invitation.role)
    user = await users.create(email=data.email, hashed_password=hashed, role=role)
    if user is None:
        raise EmailAlreadyRegistered()  # the rollback gives the invitation back
    logger.info(
        "user registered",
        extra={"tenant_id": user.tenant_id, "user_id": str(user.id), "role": user.role},
    )
    return user


async def login(
    *,
    session: AsyncSession,
    passwords: PasswordHasher,
    tokens: TokenIssuer,
    throttle: LoginThrottle,
    data: LoginRequest,
    address: str,
    refresh_ttl_seconds: int,
) -> TokenPair:
    who = {"tenant_id": data.tenant_id, "email": data.email}
    # A place among the address's logins in flight first (refused at once, counting nothing),
    # then the attempt counted, or refused, before the password is looked at: while the account
    # is refused, the right password does not get through either.
    with throttle.hashing(tenant_id=data.tenant_id, address=address):
        await throttle.admit(**who, address=address)
        users = UserRepository(session, tenant_id=data.tenant_id)
        user = await users.get_by_email(data.email)
        found = (user.id, user.hashed_password) if user is not None else None
        # End the read before waiting for a hashing thread: a login storm must not hold every
        # pooled connection while it queues for the CPU. (What follows starts anew.)
        await session.rollback()
        if found is None:
            await passwords.verify_unknown_user(data.password)
            valid, new_hash = False, None
        else:
            valid, new_hash = await _verify(passwords, data, *found)
    if not valid:
        raise InvalidCredentials()  # counted already, when admitted
    await throttle.succeeded(**who, address=address)
    user = await users.get_by_email(data.email, key_share=True)
    if user is None:  # removed while its password was checked
        raise InvalidCredentials()
    if new_hash is not None:
        await users.set_password_hash(user.id, new_hash)
        logger.info(
            "password hash upgraded",
            extra={"tenant_id": data.tenant_id, "user_id": str(user.id)},
        )
    return await sessions.start(
        session=session, tokens=tokens, user=user, ttl_seconds=refresh_ttl_seconds
    )


async def _verify(
    passwords: PasswordHasher, data: LoginRequest, user_id: object, hashed_password: str
) -> tuple[bool, str | None]:
    try:
        return await passwords.verify_and_update(data.password, hashed_password)
    except UnusableHash:
        logger.error(
            "stored password hash is in no known format; login refused",
            extra={"tenant_id": data.tenant_id, "user_id": str(user_id)},
        )
        return False, None
