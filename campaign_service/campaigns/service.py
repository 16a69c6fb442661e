from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from campaign_service.campaigns.pagination import Cursor
from campaign_service.campaigns.repository import CampaignRepository, JobLogRepository
from campaign_service.campaigns.schemas import CampaignCreate
from campaign_service.outbox.repository import OutboxRepository
from shared.events import CampaignCreated
from shared.models import Campaign, CampaignJobLog
from shared.telemetry import current_trace_context
from shared.tokens import Principal

logger = logging.getLogger(__name__)


async def create_campaign(
    *, session: AsyncSession, principal: Principal, data: CampaignCreate
) -> Campaign:
    """The campaign and its ``campaign.created`` event, in the caller's transaction."""
    campaigns = CampaignRepository(session, tenant_id=principal.tenant_id)
    campaign = campaigns.new(name=data.name, description=data.description)
    event = CampaignCreated(
        tenant_id=campaign.tenant_id,
        campaign_id=campaign.id,
        name=campaign.name,
        description=campaign.description,
        occurred_at=campaign.created_at,
    )
    # One statement writes both rows: a round trip to the database costs more than either
    # insert. The request's trace context travels with the event's row: the relay publishes in
    # it, so the event joins this request's trace even when it leaves much later (after a
    # broker outage).
    await OutboxRepository(session).add(
        event, headers=current_trace_context(), together_with=campaigns.insert(campaign)
    )
    logger.info(
        "campaign created",
        extra={
            "tenant_id": campaign.tenant_id,
            "campaign_id": str(campaign.id),
            "event_id": str(event.event_id),
        },
    )
    return campaign


async def list_campaigns(
    *, session: AsyncSession, principal: Principal, limit: int, cursor: Cursor | None
) -> tuple[Sequence[Campaign], Cursor | None]:
    rows = await CampaignRepository(session, tenant_id=principal.tenant_id).page(
        limit=limit + 1, after=cursor
    )
    page = rows[:limit]
    more = len(rows) > limit
    next_cursor = Cursor(created_at=page[-1].created_at, id=page[-1].id) if more else None
    return page, next_cursor


async def job_logs(*, session: AsyncSession, campaign: Campaign) -> Sequence[CampaignJobLog]:
    return await JobLogRepository(session, tenant_id=campaign.tenant_id).for_campaign(campaign.id)
