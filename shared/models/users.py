from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base
from shared.models.accounts import EMAIL_MAX_LENGTH, ROLE_MAX_LENGTH
from shared.tenancy import TENANT_ID_MAX_LENGTH, TenantOwned


class User(TenantOwned, Base):
    __tablename__ = "users"
    __table_args__ = (
        # Emails are stored normalised (NFKC, case-folded: user_service.users.schemas), so the
        # unique constraint compares them as one person's.
        UniqueConstraint("tenant_id", "email"),
        CheckConstraint("role IN ('owner', 'admin', 'member')", name="role"),
        Index("ix_users_tenant_id", "tenant_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(
        String(TENANT_ID_MAX_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE")
    )
    email: Mapped[str] = mapped_column(String(EMAIL_MAX_LENGTH))
    role: Mapped[str] = mapped_column(String(ROLE_MAX_LENGTH), server_default="member")
    hashed_password: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
