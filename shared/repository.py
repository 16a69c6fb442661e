"""The tenant-scoping choke point: every tenant-owned read starts from ``_select()``."""

from __future__ import annotations

from typing import Generic, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.tenancy import TenantOwned

M = TypeVar("M", bound=TenantOwned)


class TenantRepository(Generic[M]):
    """A repository bound to one tenant. Subclasses set ``model`` and build every query from
    :meth:`_select` (or filter writes with :attr:`tenant_id`), never by hand."""

    model: type[M]

    def __init__(self, session: AsyncSession, *, tenant_id: str) -> None:
        self._session = session
        self.tenant_id = tenant_id

    def _select(self) -> Select[tuple[M]]:
        return select(self.model).where(self.model.tenant_id == self.tenant_id)
