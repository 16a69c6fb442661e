"""Who is calling: the Bearer token (shared.auth), and the account it names as it is now: a
removed member is refused at once, and a role changed since the token was issued counts."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from shared.auth import CurrentPrincipal
from shared.db import SessionDep
from shared.errors import Unauthorized
from shared.models import Role, User
from user_service.members.exceptions import NotAllowed
from user_service.users.repository import UserRepository


async def current_member(principal: CurrentPrincipal, session: SessionDep) -> User:
    users = UserRepository(session, tenant_id=principal.tenant_id)
    user = await users.get(principal.user_id)
    if user is None:
        raise Unauthorized("This account no longer exists")
    return user


CurrentMember = Annotated[User, Depends(current_member)]


async def current_manager(member: CurrentMember) -> User:
    """An owner or an admin: who may invite and manage members."""
    if member.role not in (Role.OWNER, Role.ADMIN):
        raise NotAllowed()
    return member


CurrentManager = Annotated[User, Depends(current_manager)]
