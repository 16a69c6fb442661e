from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints

from shared.models.campaigns import CAMPAIGN_DESCRIPTION_MAX_LENGTH, CAMPAIGN_NAME_MAX_LENGTH

PAGE_SIZE_MAX = 100

# PostgreSQL text cannot hold a NUL character: refuse it as invalid input, not a failed insert.
NO_NUL = r"^[^\x00]*$"

CampaignName = Annotated[
    StrictStr,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=CAMPAIGN_NAME_MAX_LENGTH, pattern=NO_NUL
    ),
]
CampaignDescription = Annotated[
    StrictStr, StringConstraints(max_length=CAMPAIGN_DESCRIPTION_MAX_LENGTH, pattern=NO_NUL)
]


class CampaignCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: CampaignName = Field(
        description=f"1 to {CAMPAIGN_NAME_MAX_LENGTH} characters. "
        "`[fail:N]` in the name makes the worker's first N attempts fail, "
        "`[fail:always]` every attempt (see the README).",
        examples=["Spring sale"],
    )
    description: CampaignDescription | None = Field(
        default=None, description=f"Up to {CAMPAIGN_DESCRIPTION_MAX_LENGTH} characters."
    )


class CampaignRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: str
    name: str
    description: str | None
    created_at: datetime


class CampaignPage(BaseModel):
    items: list[CampaignRead]
    next_cursor: str | None = Field(
        description="Pass as `cursor` to get the next page; null on the last page."
    )


class JobLogRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID = Field(validation_alias="public_id")
    campaign_id: uuid.UUID
    event_id: uuid.UUID
    status: str = Field(examples=["success", "retry", "failed"])
    attempts: int
    last_error: str | None
    trace_id: str | None
    payload: dict[str, Any]
    processed_at: datetime


class JobLogList(BaseModel):
    items: list[JobLogRead]
