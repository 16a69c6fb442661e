"""campaigns, job logs, outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
    )
    op.create_index(
        "ix_campaigns_tenant_id_created_at_id",
        "campaigns",
        ["tenant_id", "created_at", "id"],
        unique=False,
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("exchange", sa.String(length=255), nullable=False),
        sa.Column("routing_key", sa.String(length=255), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "headers", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "available_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_index(op.f("ix_outbox_available_at"), "outbox", ["available_at"], unique=False)
    op.create_index(op.f("ix_outbox_created_at"), "outbox", ["created_at"], unique=False)
    op.create_table(
        "campaign_job_logs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("campaign_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('success', 'retry', 'failed')",
            name=op.f("ck_campaign_job_logs_status_known"),
        ),
        sa.CheckConstraint("attempts >= 1", name=op.f("ck_campaign_job_logs_attempts_positive")),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_campaign_job_logs_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_job_logs")),
        sa.UniqueConstraint(
            "event_id",
            "attempts",
            "status",
            name=op.f("uq_campaign_job_logs_event_id_attempts_status"),
        ),
    )
    op.create_index(
        "ix_campaign_job_logs_campaign_id_processed_at",
        "campaign_job_logs",
        ["campaign_id", "processed_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_campaign_job_logs_tenant_id"), "campaign_job_logs", ["tenant_id"], unique=False
    )
    op.create_index(
        "uq_campaign_job_logs_event_id_success",
        "campaign_job_logs",
        ["event_id"],
        unique=True,
        postgresql_where=sa.text("status = 'success'"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_campaign_job_logs_event_id_success",
        table_name="campaign_job_logs",
        postgresql_where=sa.text("status = 'success'"),
    )
    op.drop_index(op.f("ix_campaign_job_logs_tenant_id"), table_name="campaign_job_logs")
    op.drop_index("ix_campaign_job_logs_campaign_id_processed_at", table_name="campaign_job_logs")
    op.drop_table("campaign_job_logs")
    op.drop_index(op.f("ix_outbox_created_at"), table_name="outbox")
    op.drop_index(op.f("ix_outbox_available_at"), table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_campaigns_tenant_id_created_at_id", table_name="campaigns")
    op.drop_table("campaigns")
