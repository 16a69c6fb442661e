"""Invitations and members of the caller's tenant. Owners do everything; admins invite and
manage members and admins, never owners; a tenant always keeps at least one owner."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import Invitation, Role, User
from user_service.members.exceptions import (
    AlreadyMember,
    InvitationNotFound,
    LastOwner,
    MemberNotFound,
    NotAllowed,
)
from user_service.members.repository import InvitationRepository
from user_service.members.schemas import InvitationCreate, InvitationCreated
from user_service.tokens.opaque import new_token
from user_service.users.repository import UserRepository

logger = logging.getLogger(__name__)


async def invite(
    *, session: AsyncSession, manager: User, data: InvitationCreate, ttl_seconds: int
) -> InvitationCreated:
    users = UserRepository(session, tenant_id=manager.tenant_id)
    if await users.get_by_email(data.email) is not None:
        raise AlreadyMember()
    token, digest = new_token()
    invitation = await InvitationRepository(session, tenant_id=manager.tenant_id).create(
        email=data.email,
        role=Role(data.role),
        token_hash=digest,
        invited_by=manager.id,
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl_seconds),
    )
    logger.info(
        "invitation issued",
        extra={
            "tenant_id": manager.tenant_id,
            "invitation_id": str(invitation.id),
            "role": invitation.role,
            "invited_by": str(manager.id),
        },
    )
    return InvitationCreated(
        id=invitation.id,
        email=invitation.email,
        role=Role(invitation.role),
        token=token,
        expires_at=invitation.expires_at,
    )


async def pending_invitations(*, session: AsyncSession, manager: User) -> Sequence[Invitation]:
    return await InvitationRepository(session, tenant_id=manager.tenant_id).pending()


async def revoke_invitation(
    *, session: AsyncSession, manager: User, invitation_id: uuid.UUID
) -> None:
    invitations = InvitationRepository(session, tenant_id=manager.tenant_id)
    if not await invitations.revoke(invitation_id):
        raise InvitationNotFound()


async def members(*, session: AsyncSession, member: User) -> Sequence[User]:
    return await UserRepository(session, tenant_id=member.tenant_id).all()


async def change_role(
    *, session: AsyncSession, manager: User, member_id: uuid.UUID, role: Role
) -> User:
    users = UserRepository(session, tenant_id=manager.tenant_id)
    manager = await _locked(users, manager)
    target = await _manageable(users, manager, member_id)
    if role is Role.OWNER and manager.role != Role.OWNER:
        raise NotAllowed()
    if target.role == Role.OWNER and role is not Role.OWNER:
        await _not_the_last_owner(users, target)
    updated = await users.set_role(target.id, role)
    assert updated is not None  # locked with its tenant: still there
    logger.info(
        "member role changed",
        extra={"tenant_id": manager.tenant_id, "user_id": str(member_id), "role": role.value},
    )
    return updated


async def remove(*, session: AsyncSession, manager: User, member_id: uuid.UUID) -> None:
    """Remove the member: their refresh tokens go with the account; their access token lapses
    within its lifetime."""
    users = UserRepository(session, tenant_id=manager.tenant_id)
    manager = await _locked(users, manager)
    target = await _manageable(users, manager, member_id)
    if target.role == Role.OWNER:
        await _not_the_last_owner(users, target)
    await users.delete(target.id)
    logger.info(
        "member removed",
        extra={"tenant_id": manager.tenant_id, "user_id": str(member_id)},
    )


async def _locked(users: UserRepository, manager: User) -> User:
    """Lock the tenant's members, then the manager as they are now: a change made to their own
    role while this request waited for the lock counts."""
    await users.lock_tenant()
    current = await users.get(manager.id, refresh=True)
    if current is None or current.role not in (Role.OWNER, Role.ADMIN):
        raise NotAllowed()
    return current


async def _manageable(users: UserRepository, manager: User, member_id: uuid.UUID) -> User:
    """The member, if the manager's role may change them (admins may not touch owners)."""
    target = await users.get(member_id)
    if target is None:
        raise MemberNotFound()
    if target.role == Role.OWNER and manager.role != Role.OWNER:
        raise NotAllowed()
    return target


async def _not_the_last_owner(users: UserRepository, owner: User) -> None:
    if await users.owners_other_than(owner.id) == 0:
        raise LastOwner()
