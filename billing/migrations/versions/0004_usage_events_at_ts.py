"""usage_events by time, for the daily fan-out

Revision ID: 0004_usage_events_at_ts
Revises: 0003_api
"""

from __future__ import annotations

from alembic import op

revision = "0004_usage_events_at_ts"
down_revision = "0003_api"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_events_at_ts", "usage_events", ["at_ts"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_usage_events_at_ts", table_name="usage_events")
