"""tenants: a name and an IANA time zone per tenant (no row: UTC, as before)

Revision ID: 0014_tenants
Revises: 0013_credit_notes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from webhooks.sqltypes import UTCDateTime

revision = "0014_tenants"
down_revision = "0013_credit_notes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), server_default="UTC", nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    # The scheduler fans out per zone: which tenants are not on UTC.
    op.create_index("ix_tenants_timezone", "tenants", ["timezone"])


def downgrade() -> None:
    op.drop_index("ix_tenants_timezone", table_name="tenants")
    op.drop_table("tenants")
