from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from campaign_service.campaigns import service
from campaign_service.campaigns.dependencies import ValidCampaign
from campaign_service.campaigns.pagination import Cursor
from campaign_service.campaigns.schemas import (
    PAGE_SIZE_MAX,
    CampaignCreate,
    CampaignPage,
    CampaignRead,
    JobLogList,
    JobLogRead,
)
from campaign_service.metrics import CampaignMetricsDep
from shared.auth import CurrentPrincipal
from shared.db import SessionDep

router = APIRouter(
    prefix="/campaigns",
    tags=["campaigns"],
    responses={401: {"description": "Missing, invalid or expired token"}},
)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_campaign(
    data: CampaignCreate,
    principal: CurrentPrincipal,
    session: SessionDep,
    metrics: CampaignMetricsDep,
) -> CampaignRead:
    campaign = await service.create_campaign(session=session, principal=principal, data=data)
    metrics.campaigns_created.inc()
    return CampaignRead.model_validate(campaign)


@router.get("")
async def list_campaigns(
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=PAGE_SIZE_MAX, description="Page size")] = 20,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> CampaignPage:
    after = Cursor.decode(cursor) if cursor else None
    page, next_cursor = await service.list_campaigns(
        session=session, principal=principal, limit=limit, cursor=after
    )
    return CampaignPage(
        items=[CampaignRead.model_validate(campaign) for campaign in page],
        next_cursor=next_cursor.encode() if next_cursor else None,
    )


@router.get("/{campaign_id}", responses={404: {"description": "No such campaign in your tenant"}})
async def get_campaign(campaign: ValidCampaign) -> CampaignRead:
    return CampaignRead.model_validate(campaign)


@router.get(
    "/{campaign_id}/jobs", responses={404: {"description": "No such campaign in your tenant"}}
)
async def list_jobs(campaign: ValidCampaign, session: SessionDep) -> JobLogList:
    rows = await service.job_logs(session=session, campaign=campaign)
    return JobLogList(items=[JobLogRead.model_validate(row) for row in rows])
