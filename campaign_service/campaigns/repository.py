"""Every query on campaigns and their job logs, scoped to one tenant (see shared.repository)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, bindparam, insert, literal, tuple_

from campaign_service.campaigns.pagination import Cursor
from shared.db import Write
from shared.models import Campaign, CampaignJobLog
from shared.repository import TenantRepository

_CAMPAIGNS = cast(Table, Campaign.__table__)
# Built once: a statement built per call costs more to construct and cache-key than to run. Its
# parameters are named for the campaign, so that it can run inside another table's statement.
_INSERT = insert(_CAMPAIGNS).values(
    {column.key: bindparam(f"campaign_{column.key}") for column in _CAMPAIGNS.columns}
)


class CampaignRepository(TenantRepository[Campaign]):
    model = Campaign

    def new(self, *, name: str, description: str | None) -> Campaign:
        """A campaign of this tenant, not written yet: :meth:`insert` is the statement that
        writes it. Its time is this process's clock (the rows it is written with carry the
        same), not the database's."""
        return Campaign(
            id=uuid.uuid4(),
            tenant_id=self.tenant_id,
            name=name,
            description=description,
            created_at=datetime.now(UTC),
        )

    def insert(self, campaign: Campaign) -> Write:
        """The INSERT of a campaign made by :meth:`new`, for whichever repository writes the
        rows that go with it (the outbox's, in one statement). A plain INSERT: the unit of
        work's flush machinery costs more than the insert on this path, and a new campaign
        needs no tracking."""
        if campaign.tenant_id != self.tenant_id:
            raise ValueError("a campaign of another tenant")
        return Write(
            _INSERT,
            {
                "campaign_id": campaign.id,
                "campaign_tenant_id": campaign.tenant_id,
                "campaign_name": campaign.name,
                "campaign_description": campaign.description,
                "campaign_created_at": campaign.created_at,
            },
        )

    async def get(self, campaign_id: uuid.UUID) -> Campaign | None:
        statement = self._select().where(Campaign.id == campaign_id)
        return (await self._session.scalars(statement)).one_or_none()

    async def page(self, *, limit: int, after: Cursor | None) -> Sequence[Campaign]:
        statement = self._select().order_by(Campaign.created_at.desc(), Campaign.id.desc())
        if after is not None:
            statement = statement.where(
                tuple_(Campaign.created_at, Campaign.id)
                < tuple_(literal(after.created_at), literal(after.id))
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
