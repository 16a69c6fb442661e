"""job log rows get a public id (a UUID), so the API shows no global sequence number

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "campaign_job_logs",
        sa.Column(
            "public_id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False
        ),
    )
    op.create_unique_constraint(
        op.f("uq_campaign_job_logs_public_id"), "campaign_job_logs", ["public_id"]
    )


def downgrade() -> None:
    op.drop_constraint(op.f("uq_campaign_job_logs_public_id"), "campaign_job_logs", type_="unique")
    op.drop_column("campaign_job_logs", "public_id")
