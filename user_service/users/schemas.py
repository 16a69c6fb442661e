from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field

from shared.tenancy import TenantId

PASSWORD_MIN_LENGTH = 8
# An upper bound keeps one request from buying seconds of hashing.
PASSWORD_MAX_LENGTH = 128

NormalizedEmail = Annotated[EmailStr, AfterValidator(str.lower)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class RegisterRequest(_Request):
    tenant_id: TenantId = Field(
        description="1 to 63 lower-case letters, digits or inner hyphens", examples=["acme"]
    )
    email: NormalizedEmail = Field(examples=["ada@acme.test"])
    password: str = Field(
        min_length=PASSWORD_MIN_LENGTH,
        max_length=PASSWORD_MAX_LENGTH,
        examples=["correct horse battery staple"],
    )


class LoginRequest(_Request):
    tenant_id: TenantId = Field(examples=["acme"])
    email: NormalizedEmail = Field(examples=["ada@acme.test"])
    password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH)


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: str
    email: str
    created_at: datetime


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the scheme's name, not a secret)
    expires_in: int = Field(description="Seconds until the token expires")
