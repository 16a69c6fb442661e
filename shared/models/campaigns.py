from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base
from shared.tenancy import TenantOwned

CAMPAIGN_NAME_MAX_LENGTH = 200
CAMPAIGN_DESCRIPTION_MAX_LENGTH = 2000


class Campaign(TenantOwned, Base):
    __tablename__ = "campaigns"
    __table_args__ = (
        # The listing: one tenant's campaigns, newest first (and the tenant_id index).
        Index("ix_campaigns_tenant_id_created_at_id", "tenant_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(CAMPAIGN_NAME_MAX_LENGTH))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    # Fetch created_at in the INSERT's RETURNING, so a new campaign is complete after flush.
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012


class JobStatus(StrEnum):
    SUCCESS = "success"
    RETRY = "retry"
    FAILED = "failed"


class CampaignJobLog(TenantOwned, Base):
    """One row per processing step of a campaign's event."""

    __tablename__ = "campaign_job_logs"
    __table_args__ = (
        CheckConstraint("status IN ('success', 'retry', 'failed')", name="status_known"),
        CheckConstraint("attempts >= 1", name="attempts_positive"),
        # One row per processing step (an attempt and its outcome): a redelivered step finds its
        # row and does not write another.
        UniqueConstraint("event_id", "attempts", "status"),
        # At most one success per event, whatever the broker delivers twice.
        Index(
            "uq_campaign_job_logs_event_id_success",
            "event_id",
            unique=True,
            postgresql_where=text("status = 'success'"),
        ),
        Index("ix_campaign_job_logs_campaign_id_processed_at", "campaign_id", "processed_at"),
        Index("ix_campaign_job_logs_tenant_id", "tenant_id"),
    )

    # The table's own order; the API names a row by ``public_id``, which says nothing of how
    # many rows other tenants have.
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    public_id: Mapped[uuid.UUID] = mapped_column(
        server_default=text("gen_random_uuid()"), unique=True
    )
    campaign_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    event_id: Mapped[uuid.UUID]
    status: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    processed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
