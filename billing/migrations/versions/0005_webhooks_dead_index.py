"""webhooks: partial index of dead deliveries

Revision ID: 0005_webhooks_dead_index
Revises: 0004_usage_events_at_ts

The metrics collector counts dead deliveries at every scrape; delivered rows pile up by the
million, dead ones stay few, so a partial index keeps that count (and `billing webhooks
deliveries --status dead`) from scanning the table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_webhooks_dead_index"
down_revision = "0004_usage_events_at_ts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_dead",
        "webhook_deliveries",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status = 'dead'"),
        sqlite_where=sa.text("status = 'dead'"),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_dead", table_name="webhook_deliveries")
