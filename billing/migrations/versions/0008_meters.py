"""meters: how each metric aggregates (sum, count, max, unique_count, latest) and its groups

Revision ID: 0008_meters
Revises: 0007_operator_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from webhooks.sqltypes import UTCDateTime

revision = "0008_meters"
down_revision = "0007_operator_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meters",
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("aggregation", sa.String(length=16), nullable=False),
        sa.Column("property", sa.String(length=100), nullable=True),
        sa.Column("group_by", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "aggregation IN ('sum', 'count', 'max', 'unique_count', 'latest')",
            name=op.f("ck_meters_aggregation"),
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_meters")),
    )


def downgrade() -> None:
    op.drop_table("meters")
