"""The events the platform publishes, defined once. Bump ``schema_version`` on a breaking change.

Consumers ignore fields they do not know (so a producer may add one) and refuse a message whose
known fields are missing or malformed, or whose ``schema_version`` they do not speak.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.tenancy import TenantId

CAMPAIGN_CREATED = "campaign.created"


class CampaignCreated(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    event_type: Literal["campaign.created"] = "campaign.created"
    schema_version: Literal[1] = 1
    occurred_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    tenant_id: TenantId
    campaign_id: uuid.UUID
    name: str
    description: str | None = None
