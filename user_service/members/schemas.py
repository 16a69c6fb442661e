from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from shared.models import Role
from user_service.users.schemas import NormalizedEmail


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InvitationCreate(_Request):
    email: NormalizedEmail
    role: Literal["member", "admin"] = "member"


class InvitationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    role: Role
    created_at: datetime
    expires_at: datetime


class InvitationCreated(BaseModel):
    id: uuid.UUID
    email: str
    role: Role
    token: str
    expires_at: datetime


class MemberRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    role: Role
    created_at: datetime


class MemberUpdate(_Request):
    role: Role
