"""refresh tokens carry their session's start; indexes for the housekeeping's deletes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("refresh_tokens", sa.Column("session_started_at", sa.DateTime(timezone=True)))
    # A session started with its family's first token.
    op.execute(
        """
        UPDATE refresh_tokens AS token SET session_started_at = family.started
        FROM (
            SELECT family_id, min(created_at) AS started FROM refresh_tokens GROUP BY family_id
        ) AS family
        WHERE token.family_id = family.family_id
        """
    )
    op.alter_column("refresh_tokens", "session_started_at", nullable=False)
    op.create_index(op.f("ix_refresh_tokens_expires_at"), "refresh_tokens", ["expires_at"])
    op.create_index(
        op.f("ix_login_throttles_window_started_at"), "login_throttles", ["window_started_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_login_throttles_window_started_at"), "login_throttles")
    op.drop_index(op.f("ix_refresh_tokens_expires_at"), "refresh_tokens")
    op.drop_column("refresh_tokens", "session_started_at")
