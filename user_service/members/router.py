"""Invitations and members of the caller's tenant (Bearer)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response, status

from shared.db import SessionDep
from user_service.members import service
from user_service.members.dependencies import CurrentManager, CurrentMember
from user_service.members.schemas import (
    InvitationCreate,
    InvitationCreated,
    InvitationRead,
    MemberRead,
    MemberUpdate,
)
from user_service.users.dependencies import SettingsDep

router = APIRouter(
    tags=["members"], responses={401: {"description": "Missing, invalid or expired token"}}
)

_FORBIDDEN: dict[int | str, dict[str, Any]] = {
    403: {"description": "Your role does not allow this"}
}
_MANAGED: dict[int | str, dict[str, Any]] = {
    **_FORBIDDEN,
    404: {"description": "No such member in your tenant"},
    409: {"description": "That would leave the tenant without an owner"},
}


@router.post(
    "/invitations",
    status_code=status.HTTP_201_CREATED,
    responses={**_FORBIDDEN, 409: {"description": "The email already has an account"}},
)
async def create_invitation(
    data: InvitationCreate, manager: CurrentManager, session: SessionDep, settings: SettingsDep
) -> InvitationCreated:
    """Invite an email into your tenant (owners and admins). The token is shown only here:
    pass it on; whoever registers with it and that email joins with the role."""
    return await service.invite(
        session=session, manager=manager, data=data, ttl_seconds=settings.invitation_ttl_seconds
    )


@router.get("/invitations", responses=_FORBIDDEN)
async def list_invitations(manager: CurrentManager, session: SessionDep) -> list[InvitationRead]:
    """Pending invitations of your tenant (owners and admins)."""
    pending = await service.pending_invitations(session=session, manager=manager)
    return [InvitationRead.model_validate(invitation) for invitation in pending]


@router.delete(
    "/invitations/{invitation_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**_FORBIDDEN, 404: {"description": "No such pending invitation"}},
)
async def revoke_invitation(
    invitation_id: uuid.UUID, manager: CurrentManager, session: SessionDep
) -> Response:
    await service.revoke_invitation(session=session, manager=manager, invitation_id=invitation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/members")
async def list_members(member: CurrentMember, session: SessionDep) -> list[MemberRead]:
    """Everyone in your tenant, with their role."""
    everyone = await service.members(session=session, member=member)
    return [MemberRead.model_validate(user) for user in everyone]


@router.patch("/members/{member_id}", responses=_MANAGED)
async def change_role(
    member_id: uuid.UUID, data: MemberUpdate, manager: CurrentManager, session: SessionDep
) -> MemberRead:
    """Change a member's role (owners: anyone's; admins: members' and admins', never to
    owner)."""
    updated = await service.change_role(
        session=session, manager=manager, member_id=member_id, role=data.role
    )
    return MemberRead.model_validate(updated)


@router.delete("/members/{member_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_MANAGED)
async def remove_member(
    member_id: uuid.UUID, manager: CurrentManager, session: SessionDep
) -> Response:
    """Remove a member: their sessions end (refresh tokens revoked at once; an access token
    lapses within its lifetime)."""
    await service.remove(session=session, manager=manager, member_id=member_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
