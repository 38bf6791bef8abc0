"""invoice lines of kind `adjustment` (late usage billed on a later invoice), and the late units
a credit note line gives back

Revision ID: 0017_adjustment_lines
Revises: 0016_price_dimensions
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017_adjustment_lines"
down_revision = "0016_price_dimensions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _add_line_columns_sqlite()
    else:
        op.add_column(
            "invoice_lines",
            sa.Column("kind", sa.String(length=16), server_default="charge", nullable=False),
        )
        op.add_column(
            "invoice_lines", sa.Column("adjusts_invoice_id", sa.String(length=36), nullable=True)
        )
        op.create_foreign_key(
            op.f("fk_invoice_lines_adjusts_invoice_id_invoices"),
            "invoice_lines",
            "invoices",
            ["adjusts_invoice_id"],
            ["id"],
        )
        op.create_check_constraint(op.f("ck_invoice_lines_kind"), "invoice_lines", _KINDS)
    # What a finalized invoice's late usage has been billed: its adjustment lines elsewhere.
    op.create_index("ix_invoice_lines_adjusts_invoice_id", "invoice_lines", ["adjusts_invoice_id"])
    op.add_column("credit_note_lines", sa.Column("quantity", sa.BigInteger(), nullable=True))


_KINDS = "kind IN ('charge', 'adjustment')"


def _add_line_columns_sqlite() -> None:
    """SQLite adds the columns with their constraints in place: a batch copy of the table would
    drop it, which credit note lines pointing at its rows forbid."""
    op.execute(
        "ALTER TABLE invoice_lines ADD COLUMN kind VARCHAR(16) DEFAULT 'charge' NOT NULL "
        f"CONSTRAINT ck_invoice_lines_kind CHECK ({_KINDS})"
    )
    op.execute(
        "ALTER TABLE invoice_lines ADD COLUMN adjusts_invoice_id VARCHAR(36) "
        "CONSTRAINT fk_invoice_lines_adjusts_invoice_id_invoices REFERENCES invoices (id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("credit_note_lines") as batch:
        batch.drop_column("quantity")
    op.drop_index("ix_invoice_lines_adjusts_invoice_id", table_name="invoice_lines")
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("invoice_lines") as batch:
        batch.drop_constraint("ck_invoice_lines_kind", type_="check")
        if not sqlite:  # SQLite copies the table without the column and its reference
            batch.drop_constraint(
                "fk_invoice_lines_adjusts_invoice_id_invoices", type_="foreignkey"
            )
        batch.drop_column("adjusts_invoice_id")
        batch.drop_column("kind")
