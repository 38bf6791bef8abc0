"""invoice lifecycle: draft and uncollectible states, numbers, one not-void invoice per period

Existing invoices keep `paid` and `void` and become `open` otherwise; each receives a number
(`INVOICE_NUMBER_PREFIX`, `INV-` by default, and a zero-padded sequence) in creation order.

Revision ID: 0012_invoice_lifecycle
Revises: 0011_usage_aggregate_groups
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import op

from webhooks.sqltypes import UTCDateTime

revision = "0012_invoice_lifecycle"
down_revision = "0011_usage_aggregate_groups"
branch_labels = None
depends_on = None

_STATUSES = "status IN ('draft', 'open', 'paid', 'void', 'uncollectible')"
_NOT_VOID = sa.text("status <> 'void'")
_LIVE_INDEX = "uq_invoices_not_void_tenant_id_period_currency"
_PERIOD = ["tenant_id", "period_start", "period_end", "currency"]


def upgrade() -> None:
    op.create_table(
        "number_sequences",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_number_sequences")),
    )
    with op.batch_alter_table("invoices", recreate="auto") as batch:
        batch.drop_constraint(
            "uq_invoices_tenant_id_period_start_period_end_currency", type_="unique"
        )
        batch.drop_constraint("ck_invoices_status", type_="check")
        batch.create_check_constraint(op.f("ck_invoices_status"), _STATUSES)
        batch.add_column(sa.Column("number", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("finalized_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("paid_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("voided_at", UTCDateTime(), nullable=True))
        batch.create_unique_constraint(op.f("uq_invoices_number"), ["number"])
    op.create_index(
        _LIVE_INDEX,
        "invoices",
        _PERIOD,
        unique=True,
        postgresql_where=_NOT_VOID,
        sqlite_where=_NOT_VOID,
    )
    _number_existing_invoices(os.environ.get("INVOICE_NUMBER_PREFIX", "INV-"))


def _number_existing_invoices(prefix: str) -> None:
    bind = op.get_bind()
    ids = bind.execute(sa.text("SELECT id FROM invoices ORDER BY created_at, id")).scalars().all()
    for sequence, invoice_id in enumerate(ids, start=1):
        bind.execute(
            sa.text(
                "UPDATE invoices SET number = :number, finalized_at = created_at WHERE id = :id"
            ),
            {"number": f"{prefix}{sequence:06d}", "id": invoice_id},
        )
    bind.execute(
        sa.text("INSERT INTO number_sequences (name, last_value) VALUES ('invoice', :last)"),
        {"last": len(ids)},
    )


def downgrade() -> None:
    op.drop_index(_LIVE_INDEX, table_name="invoices")
    op.execute("UPDATE invoices SET status = 'open' WHERE status IN ('draft', 'uncollectible')")
    with op.batch_alter_table("invoices", recreate="auto") as batch:
        batch.drop_constraint("uq_invoices_number", type_="unique")
        batch.drop_column("voided_at")
        batch.drop_column("paid_at")
        batch.drop_column("finalized_at")
        batch.drop_column("number")
        batch.drop_constraint("ck_invoices_status", type_="check")
        batch.create_check_constraint(
            op.f("ck_invoices_status"), "status IN ('open', 'paid', 'void')"
        )
        batch.create_unique_constraint(
            "uq_invoices_tenant_id_period_start_period_end_currency", _PERIOD
        )
    op.drop_table("number_sequences")
