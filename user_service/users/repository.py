"""Every query on ``users``, scoped to one tenant (see shared.repository)."""

from __future__ import annotations

import uuid

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert

from shared.models import User
from shared.repository import TenantRepository


class UserRepository(TenantRepository[User]):
    model = User

    async def create(self, *, email: str, hashed_password: str) -> User | None:
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
            )
            .on_conflict_do_nothing(index_elements=[User.tenant_id, User.email])
            .returning(User)
        )
        return (await self._session.scalars(statement)).one_or_none()

    async def get_by_email(self, email: str) -> User | None:
        statement = self._select().where(User.email == email)
        return (await self._session.scalars(statement)).one_or_none()

    async def set_password_hash(self, user_id: uuid.UUID, hashed_password: str) -> None:
        await self._session.execute(
            update(User)
            .where(User.tenant_id == self.tenant_id, User.id == user_id)
            .values(hashed_password=hashed_password)
        )
