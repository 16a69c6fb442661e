from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from campaign_service.campaigns.exceptions import CampaignNotFound
from campaign_service.campaigns.repository import CampaignRepository
from shared.auth import CurrentPrincipal
from shared.db import SessionDep
from shared.models import Campaign


async def valid_campaign(
    campaign_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep
) -> Campaign:
    """The caller's campaign, or 404: another tenant's campaign does not exist for them."""
    campaign = await CampaignRepository(session, tenant_id=principal.tenant_id).get(campaign_id)
    if campaign is None:
        raise CampaignNotFound()
    return campaign


ValidCampaign = Annotated[Campaign, Depends(valid_campaign)]
