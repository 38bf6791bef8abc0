"""prices per dimension: `prices.dimensions` and the group an invoice line bills

Revision ID: 0016_price_dimensions
Revises: 0015_invoice_provider_status
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_price_dimensions"
down_revision = "0015_invoice_provider_status"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prices") as batch:
        batch.add_column(sa.Column("dimensions", sa.JSON(), nullable=True))
    with op.batch_alter_table("invoice_lines") as batch:
        batch.add_column(sa.Column("dimensions", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("invoice_lines") as batch:
        batch.drop_column("dimensions")
    with op.batch_alter_table("prices") as batch:
        batch.drop_column("dimensions")
