from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, EmailStr, Field

from shared.models import Role
from shared.tenancy import TenantId

PASSWORD_MIN_LENGTH = 8
# An upper bound keeps one request from buying seconds of hashing.
PASSWORD_MAX_LENGTH = 128
# Invitation and refresh tokens are 43 characters (32 random bytes, URL-safe base64).
OPAQUE_TOKEN_MAX_LENGTH = 128


def fold_email(value: object) -> object:
    """One person, one account: Unicode NFKC (fullwidth letters become ASCII) and case-folded
    as a whole, the local part included."""
    return unicodedata.normalize("NFKC", value).casefold() if isinstance(value, str) else value


# Folded before validation (so a look-alike form validates as the plain one) and after it.
NormalizedEmail = Annotated[EmailStr, BeforeValidator(fold_email), AfterValidator(fold_email)]
OpaqueToken = Annotated[str, Field(min_length=1, max_length=OPAQUE_TOKEN_MAX_LENGTH)]


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
    invitation: OpaqueToken | None = Field(
        default=None,
        description="Needed to join a tenant that exists: the token of an invitation issued "
        "for this email in this tenant (POST /invitations). Without one, the tenant is created "
        "and the caller becomes its owner.",
    )


class LoginRequest(_Request):
    tenant_id: TenantId = Field(examples=["acme"])
    email: NormalizedEmail = Field(examples=["ada@acme.test"])
    password: str = Field(min_length=1, max_length=PASSWORD_MAX_LENGTH)


class RefreshRequest(_Request):
    refresh_token: OpaqueToken


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: str
    email: str
    role: Role
    created_at: datetime


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the scheme's name, not a secret)
    expires_in: int = Field(description="Seconds until the access token expires")
    refresh_token: str = Field(
        description="Single use: POST /token/refresh trades it for a new pair"
    )
    refresh_expires_in: int = Field(description="Seconds until the refresh token expires")
