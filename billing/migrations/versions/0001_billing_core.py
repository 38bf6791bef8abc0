"""billing core

Revision ID: 0001_billing_core
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from webhooks.sqltypes import ExactDecimal, UTCDateTime

revision = "0001_billing_core"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "invoices",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("period_end", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total_amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("provider_invoice_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("status IN ('open', 'paid', 'void')", name=op.f("ck_invoices_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint(
            "tenant_id",
            "period_start",
            "period_end",
            "currency",
            name=op.f("uq_invoices_tenant_id_period_start_period_end_currency"),
        ),
    )
    op.create_table(
        "plans",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
        sa.UniqueConstraint("key", name=op.f("uq_plans_key")),
    )
    op.create_table(
        "usage_aggregates",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("granularity", sa.String(length=16), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_aggregates")),
        sa.UniqueConstraint(
            "tenant_id",
            "metric",
            "period_start",
            "granularity",
            name=op.f("uq_usage_aggregates_tenant_id_metric_period_start_granularity"),
        ),
    )
    op.create_table(
        "usage_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("at_ts", UTCDateTime(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("metadata_json", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_events")),
        sa.UniqueConstraint(
            "tenant_id",
            "metric",
            "idempotency_key",
            name=op.f("uq_usage_events_tenant_id_metric_idempotency_key"),
        ),
    )
    op.create_index(
        "ix_usage_events_tenant_id_metric_at_ts",
        "usage_events",
        ["tenant_id", "metric", "at_ts"],
        unique=False,
    )
    op.create_table(
        "invoice_lines",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("invoice_id", sa.String(length=36), nullable=False),
        sa.Column("price_id", sa.String(length=36), nullable=True),
        sa.Column("metric", sa.String(length=100), nullable=True),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"], ["invoices.id"], name=op.f("fk_invoice_lines_invoice_id_invoices")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoice_lines")),
    )
    op.create_index("ix_invoice_lines_invoice_id", "invoice_lines", ["invoice_id"], unique=False)
    op.create_table(
        "plan_entitlements",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("plan_id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("limit_per_window", sa.BigInteger(), nullable=False),
        sa.Column("window", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "\"window\" IN ('day', 'month')", name=op.f("ck_plan_entitlements_window")
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["plans.id"], name=op.f("fk_plan_entitlements_plan_id_plans")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_entitlements")),
        sa.UniqueConstraint(
            "plan_id", "key", "window", name=op.f("uq_plan_entitlements_plan_id_key_window")
        ),
    )
    op.create_table(
        "prices",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("unit_amount", sa.BigInteger(), nullable=True),
        sa.Column("metric", sa.String(length=100), nullable=True),
        sa.Column("recurring_interval", sa.String(length=16), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("plan_id", sa.String(length=36), nullable=True),
        sa.Column("unit_amount_decimal", ExactDecimal(), nullable=True),
        sa.Column("billing_scheme", sa.String(length=16), nullable=False),
        sa.Column("tiers_mode", sa.String(length=16), nullable=True),
        sa.Column("tiers", sa.JSON(), nullable=True),
        sa.Column("transform_divide_by", sa.BigInteger(), nullable=True),
        sa.Column("transform_round", sa.String(length=8), nullable=True),
        sa.CheckConstraint(
            "billing_scheme IN ('per_unit', 'tiered')", name=op.f("ck_prices_billing_scheme")
        ),
        sa.CheckConstraint(
            "tiers_mode IS NULL OR tiers_mode IN ('graduated', 'volume')",
            name=op.f("ck_prices_tiers_mode"),
        ),
        sa.CheckConstraint(
            "transform_round IS NULL OR transform_round IN ('up', 'down')",
            name=op.f("ck_prices_transform_round"),
        ),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name=op.f("fk_prices_plan_id_plans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prices")),
        sa.UniqueConstraint("key", name=op.f("uq_prices_key")),
    )
    op.create_index("ix_prices_plan_id", "prices", ["plan_id"], unique=False)
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("plan_id", sa.String(length=36), nullable=False),
        sa.Column("effective_at", UTCDateTime(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["plans.id"], name=op.f("fk_subscriptions_plan_id_plans")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_index("ix_subscriptions_tenant_id", "subscriptions", ["tenant_id"], unique=False)


def downgrade() -> None:

    op.drop_index("ix_subscriptions_tenant_id", table_name="subscriptions")
    op.drop_table("subscriptions")
    op.drop_index("ix_prices_plan_id", table_name="prices")
    op.drop_table("prices")
    op.drop_table("plan_entitlements")
    op.drop_index("ix_invoice_lines_invoice_id", table_name="invoice_lines")
    op.drop_table("invoice_lines")
    op.drop_index("ix_usage_events_tenant_id_metric_at_ts", table_name="usage_events")
    op.drop_table("usage_events")
    op.drop_table("usage_aggregates")
    op.drop_table("plans")
    op.drop_table("invoices")
