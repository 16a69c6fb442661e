"""Every query on campaigns and their job logs, scoped to one tenant (see shared.repository)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, insert, tuple_

from campaign_service.campaigns.pagination import Cursor
from shared.models import Campaign, CampaignJobLog
from shared.repository import TenantRepository

_CAMPAIGNS = cast(Table, Campaign.__table__)
# Built once: a statement built per call costs more to construct and cache-key than to run.
_INSERT = insert(_CAMPAIGNS).returning(_CAMPAIGNS.c.created_at)


class CampaignRepository(TenantRepository[Campaign]):
    model = Campaign

    async def add(self, *, name: str, description: str | None) -> Campaign:
        # A plain INSERT ... RETURNING: the unit of work's flush machinery costs more than the
        # insert itself on this path, and a new campaign needs no tracking.
        values = {
            "id": uuid.uuid4(),
            "tenant_id": self.tenant_id,
            "name": name,
            "description": description,
        }
        created_at = (await self._session.execute(_INSERT, values)).scalar_one()
        return Campaign(**values, created_at=created_at)

    async def get(self, campaign_id: uuid.UUID) -> Campaign | None:
        statement = self._select().where(Campaign.id == campaign_id)
        return (await self._session.scalars(statement)).one_or_none()

    async def page(self, *, limit: int, after: Cursor | None) -> Sequence[Campaign]:
        statement = self._select().order_by(Campaign.created_at.desc(), Campaign.id.desc())
        if after is not None:
            statement = statement.where(
                tuple_(Campaign.created_at, Campaign.id) < tuple_(after.created_at, after.id)
            )
        return (await self._session.scalars(statement.limit(limit))).all()


class JobLogRepository(TenantRepository[CampaignJobLog]):
    model = CampaignJobLog

    async def for_campaign(self, campaign_id: uuid.UUID) -> Sequence[CampaignJobLog]:
        statement = (
            self._select()
            .where(CampaignJobLog.campaign_id == campaign_id)
            .order_by(CampaignJobLog.processed_at, CampaignJobLog.id)
        )
        return (await self._session.scalars(statement)).all()
