"""indexes for `billing status`: the last aggregate and invoice runs, unsynced invoices

Revision ID: 0006_status_indexes
Revises: 0005_webhooks_dead_index
"""

from __future__ import annotations

from alembic import op

revision = "0006_status_indexes"
down_revision = "0005_webhooks_dead_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_aggregates_updated_at", "usage_aggregates", ["updated_at"])
    op.create_index("ix_invoices_created_at", "invoices", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_invoices_created_at", table_name="invoices")
    op.drop_index("ix_usage_aggregates_updated_at", table_name="usage_aggregates")
