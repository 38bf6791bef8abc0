"""webhooks: the slot a claimed delivery is sent in, to chain one subscription's deliveries

Revision ID: 0021_webhooks_delivery_slots
Revises: 0020_counters_per_local_date

A relay may claim several of one subscription's deliveries as one slot, a chain it sends one
after another (`webhooks.store`). The cap per subscription then counts slots in flight, not
deliveries: `slot` names the chain a claimed delivery belongs to (NULL: a slot of its own), and
is cleared with `claimed_until` when the outcome is recorded or the claim handed back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021_webhooks_delivery_slots"
down_revision = "0020_counters_per_local_date"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("slot", sa.String(length=36), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("slot")
