"""webhooks: the end of a delivery's claim, to cap deliveries in flight per subscription

Revision ID: 0009_webhooks_claimed_until
Revises: 0008_meters

A relay counts each subscription's deliveries in flight (claimed, lease not over) and claims no
more than `WEBHOOKS_MAX_IN_FLIGHT_PER_SUBSCRIPTION` of them; `claimed_until` is set by a claim
and cleared when the outcome is recorded, so the partial index holds only the few in flight.
A partial index of delivered deliveries by `delivered_at` lets retention find what to delete.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from webhooks.sqltypes import UTCDateTime

revision = "0009_webhooks_claimed_until"
down_revision = "0008_meters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("claimed_until", UTCDateTime(), nullable=True))
    op.create_index(
        "ix_webhook_deliveries_claimed",
        "webhook_deliveries",
        ["claimed_until", "subscription_id"],
        unique=False,
        postgresql_where=sa.text("claimed_until IS NOT NULL"),
        sqlite_where=sa.text("claimed_until IS NOT NULL"),
    )

    op.create_index(
        "ix_webhook_deliveries_delivered",
        "webhook_deliveries",
        ["delivered_at"],
        unique=False,
        postgresql_where=sa.text("status = 'delivered'"),
        sqlite_where=sa.text("status = 'delivered'"),
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_delivered", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_claimed", table_name="webhook_deliveries")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("claimed_until")
