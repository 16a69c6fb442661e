"""tenants and their owners, invitations, refresh tokens, login throttling

Every existing tenant gets a row, its earliest user (by created_at, then id) becomes its owner
and its other users members. Stored emails are folded as registration and login now fold them
(Unicode NFKC, then case-folded), in Python, as the service does. Where an account's folded
email is already another account's of the same tenant (two registrations of one person from
before), it keeps its own and a warning names it: an operator merges the two.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

import logging
import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

logger = logging.getLogger("alembic.runtime.migration")

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.execute(
        "INSERT INTO tenants (id, created_at) "
        "SELECT tenant_id, min(created_at) FROM users GROUP BY tenant_id"
    )
    op.add_column(
        "users",
        sa.Column("role", sa.String(length=16), server_default="member", nullable=False),
    )
    op.execute(
        """
        UPDATE users SET role = 'owner'
        WHERE id IN (
            SELECT DISTINCT ON (tenant_id) id FROM users ORDER BY tenant_id, created_at, id
        )
        """
    )
    op.create_check_constraint(
        op.f("ck_users_role"), "users", "role IN ('owner', 'admin', 'member')"
    )
    op.create_foreign_key(
        op.f("fk_users_tenant_id_tenants"),
        "users",
        "tenants",
        ["tenant_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.drop_constraint(op.f("ck_users_email_lowercase"), "users", type_="check")
    _fold_emails()

    op.create_table(
        "invitations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("invited_by", sa.Uuid(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('admin', 'member')", name=op.f("ck_invitations_role")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_invitations_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invitations")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_invitations_token_hash")),
    )
    op.create_index("ix_invitations_tenant_id", "invitations", ["tenant_id"])

    op.create_table(
        "refresh_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("family_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_refresh_tokens_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refresh_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_refresh_tokens_token_hash")),
    )
    op.create_index("ix_refresh_tokens_family_id", "refresh_tokens", ["family_id"])
    op.create_index("ix_refresh_tokens_user_id", "refresh_tokens", ["user_id"])

    op.create_table(
        "login_throttles",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_login_throttles")),
    )


def _fold(email: str) -> str:
    """user_service.users.schemas.fold_email as of this revision (before and after the email's
    validation, which left stored emails as they are): frozen here, as a migration must be."""
    folded = unicodedata.normalize("NFKC", email).casefold()
    return unicodedata.normalize("NFKC", folded).casefold()


def _fold_emails() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.text("SELECT id, tenant_id, email FROM users ORDER BY tenant_id, created_at, id")
    ).all()
    taken = {(tenant_id, email) for _, tenant_id, email in rows}
    changes = []
    for user_id, tenant_id, email in rows:
        folded = _fold(email)
        if folded == email:
            continue
        if (tenant_id, folded) in taken:
            logger.warning(
                "email not folded: another account of the tenant has that form",
                extra={"tenant_id": tenant_id, "user_id": str(user_id)},
            )
            continue
        taken.add((tenant_id, folded))
        changes.append({"id": user_id, "email": folded})
    if changes:
        connection.execute(sa.text("UPDATE users SET email = :email WHERE id = :id"), changes)


def downgrade() -> None:
    op.drop_table("login_throttles")
    op.drop_index("ix_refresh_tokens_user_id", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_family_id", table_name="refresh_tokens")
    op.drop_table("refresh_tokens")
    op.drop_index("ix_invitations_tenant_id", table_name="invitations")
    op.drop_table("invitations")
    # NOT VALID: a folded email need not equal its lower() (Cherokee letters fold to upper case).
    op.execute(
        "ALTER TABLE users ADD CONSTRAINT ck_users_email_lowercase "
        "CHECK (email = lower(email)) NOT VALID"
    )
    op.drop_constraint(op.f("fk_users_tenant_id_tenants"), "users", type_="foreignkey")
    op.drop_constraint(op.f("ck_users_role"), "users", type_="check")
    op.drop_column("users", "role")
    op.drop_table("tenants")
