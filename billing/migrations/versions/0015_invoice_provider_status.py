"""invoices.provider_status: the invoice status the payment provider was last brought to

Revision ID: 0015_invoice_provider_status
Revises: 0014_tenants

Invoices already synced keep the provider as it is: their `provider_status` becomes their
status now (a payment or void made before this release is not sent again).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_invoice_provider_status"
down_revision = "0014_tenants"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.add_column(sa.Column("provider_status", sa.String(length=16), nullable=True))
    op.execute("UPDATE invoices SET provider_status = status WHERE provider_invoice_id IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("invoices") as batch:
        batch.drop_column("provider_status")
