"""usage_aggregates per group: `group_key` (empty for the whole metric) joins the unique rule

Revision ID: 0011_usage_aggregate_groups
Revises: 0010_webhooks_secrets_encrypted
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_usage_aggregate_groups"
down_revision = "0010_webhooks_secrets_encrypted"
branch_labels = None
depends_on = None

_OLD = "uq_usage_aggregates_tenant_id_metric_period_start_granularity"
_NEW = "uq_usage_aggregates_group"
_OLD_COLUMNS = ["tenant_id", "metric", "period_start", "granularity"]


def upgrade() -> None:
    with op.batch_alter_table("usage_aggregates") as batch:
        batch.add_column(
            sa.Column("group_key", sa.String(length=1200), server_default="", nullable=False)
        )
        batch.drop_constraint(_OLD, type_="unique")
        batch.create_unique_constraint(_NEW, [*_OLD_COLUMNS, "group_key"])


def downgrade() -> None:
    op.execute("DELETE FROM usage_aggregates WHERE group_key <> ''")
    with op.batch_alter_table("usage_aggregates") as batch:
        batch.drop_constraint(_NEW, type_="unique")
        batch.create_unique_constraint(_OLD, _OLD_COLUMNS)
        batch.drop_column("group_key")
