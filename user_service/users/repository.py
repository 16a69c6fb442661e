"""Every query on ``users`` and ``tenants``, scoped to one tenant (see shared.repository)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from shared.models import Role, Tenant, User
from shared.repository import TenantRepository


class UserRepository(TenantRepository[User]):
    model = User

    async def create_tenant(self) -> bool:
        """Create this repository's tenant; False when it exists already. ``ON CONFLICT DO
        NOTHING`` waits for a concurrent creation to commit or roll back, so of two racing
        registrations that create one tenant exactly one does."""
        statement = (
            insert(Tenant)
            .values(id=self.tenant_id)
            .on_conflict_do_nothing(index_elements=[Tenant.id])
            .returning(Tenant.id)
        )
        return (await self._session.scalar(statement)) is not None

    async def lock_tenant(self) -> None:
        """Hold the tenant's row until the transaction ends: changes to its owners queue up, so
        two of them cannot each leave the other as the last owner and remove it."""
        await self._session.execute(
            select(Tenant.id).where(Tenant.id == self.tenant_id).with_for_update()
        )

    async def create(self, *, email: str, hashed_password: str, role: Role) -> User | None:
        """Insert the user, or return None when the email is already taken in this tenant.

        ``ON CONFLICT DO NOTHING`` waits for a concurrent insert of the same email to commit or
        roll back, so of two racing registrations exactly one gets a row.
        """
        statement = (
            insert(User)
            .values(
                id=uuid.uuid4(),
                tenant_id=self.tenant_id,
                email=email,
                hashed_password=hashed_password,
                role=role.value,
            )
            .on_conflict_do_nothing(index_elements=[User.tenant_id, User.email])
            .returning(User)
        )
        return (await self._session.scalars(statement)).one_or_none()

    async def get(self, user_id: uuid.UUID, *, refresh: bool = False) -> User | None:
        """The user; with ``refresh``, read again from the database (not the session's copy)."""
        statement = self._select().where(User.id == user_id)
        if refresh:
            statement = statement.execution_options(populate_existing=True)
        return (await self._session.scalars(statement)).one_or_none()

    async def get_by_email(self, email: str, *, key_share: bool = False) -> User | None:
        """The user; with ``key_share``, its row held until the transaction ends, so that a
        removal of the account waits (rows that point to it can still be written)."""
        statement = self._select().where(User.email == email)
        if key_share:
            statement = statement.with_for_update(key_share=True)
        return (await self._session.scalars(statement)).one_or_none()

    async def all(self) -> Sequence[User]:
        statement = self._select().order_by(User.created_at, User.id)
        return (await self._session.scalars(statement)).all()

    async def owners_other_than(self, user_id: uuid.UUID) -> int:
        statement = (
            select(func.count())
            .select_from(User)
            .where(User.tenant_id == self.tenant_id, User.role == Role.OWNER, User.id != user_id)
        )
        return int(await self._session.scalar(statement) or 0)

    async def set_role(self, user_id: uuid.UUID, role: Role) -> User | None:
        statement = (
            update(User)
            .where(User.tenant_id == self.tenant_id, User.id == user_id)
            .values(role=role.value)
            .returning(User)
        )
        return (await self._session.scalars(statement)).one_or_none()

    async def delete(self, user_id: uuid.UUID) -> None:
        """Remove the user; their refresh tokens go with them (``ON DELETE CASCADE``)."""
        await self._session.execute(
            delete(User).where(User.tenant_id == self.tenant_id, User.id == user_id)
        )

    async def set_password_hash(self, user_id: uuid.UUID, hashed_password: str) -> None:
        await self._session.execute(
            update(User)
            .where(User.tenant_id == self.tenant_id, User.id == user_id)
            .values(hashed_password=hashed_password)
        )
