"""Tenants and what user_service keeps about accounts: invitations, refresh tokens and the
login-throttle counters. Secrets (invitation and refresh tokens) are stored as SHA-256 hashes
only; the token itself is shown once, to whoever it is for."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base
from shared.tenancy import TENANT_ID_MAX_LENGTH, TenantOwned

EMAIL_MAX_LENGTH = 320
ROLE_MAX_LENGTH = 16


class Role(StrEnum):
    OWNER = "owner"  # everything, managing owners included
    ADMIN = "admin"  # invites, manages members
    MEMBER = "member"  # uses the product


class Tenant(Base):
    """A tenant, created by its first user (its owner)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(TENANT_ID_MAX_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Invitation(TenantOwned, Base):
    """A single-use invitation into a tenant, for one email, with the role it grants."""

    __tablename__ = "invitations"
    __table_args__ = (
        CheckConstraint("role IN ('admin', 'member')", name="role"),
        Index("ix_invitations_tenant_id", "tenant_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(
        String(TENANT_ID_MAX_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE")
    )
    email: Mapped[str] = mapped_column(String(EMAIL_MAX_LENGTH))
    role: Mapped[str] = mapped_column(String(ROLE_MAX_LENGTH))
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    invited_by: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RefreshToken(TenantOwned, Base):
    """One refresh token of a login's family: each use rotates it (``rotated_at``) into a new
    one of the same family; reuse of a rotated one revokes the whole family."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (
        Index("ix_refresh_tokens_family_id", "family_id"),
        Index("ix_refresh_tokens_user_id", "user_id"),
        Index("ix_refresh_tokens_expires_at", "expires_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    family_id: Mapped[uuid.UUID]
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rotated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the family's login was: copied from token to token, so that no deletion of old
    # tokens moves it.
    session_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LoginThrottle(Base):
    """Failed logins of one key (an account: tenant and email; or a client address) in the
    window that started at ``window_started_at``, and until when its logins are refused."""

    __tablename__ = "login_throttles"
    __table_args__ = (Index("ix_login_throttles_window_started_at", "window_started_at"),)

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    window_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    blocked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
