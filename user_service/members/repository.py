"""Every query on ``invitations``, scoped to one tenant (see shared.repository)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Select, exists, func, update

from shared.models import Invitation, Role, User
from shared.repository import TenantRepository


class InvitationRepository(TenantRepository[Invitation]):
    model = Invitation

    def _pending(self) -> Select[tuple[Invitation]]:
        """Invitations still good: not used, revoked or expired, and issued by someone who is
        still an owner or admin of the tenant (a removed or demoted admin's lapse with them)."""
        issuer_manages = exists().where(
            User.id == Invitation.invited_by,
            User.tenant_id == Invitation.tenant_id,
            User.role.in_((Role.OWNER.value, Role.ADMIN.value)),
        )
        return self._select().where(
            Invitation.used_at.is_(None),
            Invitation.revoked_at.is_(None),
            Invitation.expires_at > func.now(),
            issuer_manages,
        )

    async def create(
        self,
        *,
        email: str,
        role: Role,
        token_hash: bytes,
        invited_by: uuid.UUID,
        expires_at: datetime,
    ) -> Invitation:
        invitation = Invitation(
            id=uuid.uuid4(),
            tenant_id=self.tenant_id,
            email=email,
            role=role.value,
            token_hash=token_hash,
            invited_by=invited_by,
            expires_at=expires_at,
        )
        self._session.add(invitation)
        await self._session.flush()
        return invitation

    async def pending(self) -> Sequence[Invitation]:
        statement = self._pending().order_by(Invitation.created_at, Invitation.id)
        return (await self._session.scalars(statement)).all()

    async def claim(self, *, email: str, token_hash: bytes) -> Invitation | None:
        """The pending invitation with this token for ``email``, used up (in the transaction
        under way: a registration that fails afterwards gives it back); None if there is
        none. Locked first, so two registrations cannot both use it."""
        statement = (
            self._pending()
            .where(Invitation.token_hash == token_hash, Invitation.email == email)
            .with_for_update()
        )
        invitation = (await self._session.scalars(statement)).one_or_none()
        if invitation is not None:
            invitation.used_at = datetime.now(UTC)
            await self._session.flush()
        return invitation

    async def revoke(self, invitation_id: uuid.UUID) -> bool:
        """Revoke a pending invitation; False when the tenant has no such pending one."""
        statement = (
            update(Invitation)
            .where(
                Invitation.tenant_id == self.tenant_id,
                Invitation.id == invitation_id,
                Invitation.used_at.is_(None),
                Invitation.revoked_at.is_(None),
            )
            .values(revoked_at=func.now())
            .returning(Invitation.id)
        )
        return (await self._session.scalar(statement)) is not None
