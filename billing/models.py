"""The billing ledger's tables, as SQLAlchemy 2.0 typed models.

Every id is a UUID string, every datetime an aware UTC datetime (see `UTCDateTime`), every
amount of money an integer in the currency's minor unit, or an exact `Decimal` where a unit
price is finer than that.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from webhooks.sqltypes import NAMING_CONVENTION, ExactDecimal, UTCDateTime, new_id, utcnow

#: Exact decimal minor units, e.g. 0.0002 cents per token.
DecimalAmount = ExactDecimal()

_DDL = TypeVar("_DDL", UniqueConstraint, Index)


class Base(DeclarativeBase):
    """Declarative base of the billing tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


def _id() -> Mapped[str]:
    return mapped_column(String(36), primary_key=True, default=new_id)


def _created_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow, nullable=False)


def only_on(dialect: str, item: _DDL) -> _DDL:
    """`item` (a constraint or index) exists on `dialect` only: created there alone, and
    compared with the database there alone (`info["dialects"]`, see `billing.migrations`)."""
    item.info["dialects"] = (dialect,)
    return item.ddl_if(dialect=dialect)


class UsageEvent(Base):
    """One metered use, recorded once per (tenant, metric, idempotency key).

    On PostgreSQL the table is partitioned by month of `at_ts` (see `billing.partitions`): its
    primary key and unique key hold `at_ts`, and `usage_event_keys` keeps the keys unique.
    """

    __tablename__ = "usage_events"
    __table_args__ = (
        only_on("sqlite", UniqueConstraint("tenant_id", "metric", "idempotency_key")),
        only_on("postgresql", UniqueConstraint("tenant_id", "metric", "idempotency_key", "at_ts")),
        Index("ix_usage_events_tenant_id_metric_at_ts", "tenant_id", "metric", "at_ts"),
        # The scheduler's daily fan-out asks which (tenant, metric) pairs have usage on a day.
        Index("ix_usage_events_at_ts", "at_ts"),
    )

    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(String(64), nullable=False)
    metric: Mapped[str] = mapped_column(String(100), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    at_ts: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False)
    metadata_json: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = _created_at()


class UsageAggregate(Base):
    """A tenant's total of one metric over one period (for granularity `day`, a day of the
    tenant's zone; `period_start` is its local midnight, in UTC).

    `group_key` is empty for the whole metric, else the compact JSON of the group's values
    (`{"model":"gpt-4"}`) under the meter's `group_by`.
    """

    __tablename__ = "usage_aggregates"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id",
            "metric",
            "period_start",
            "granularity",
            "group_key",
            name="uq_usage_aggregates_group",
        ),
        Index("ix_usage_aggregates_updated_at", "updated_at"),  # `billing status`: last run
    )

    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(String(64), nullable=False)
    metric: Mapped[str] = mapped_column(String(100), nullable=False)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    granularity: Mapped[str] = mapped_column(String(16), nullable=False)
    group_key: Mapped[str] = mapped_column(
        String(1200), default="", server_default="", nullable=False
    )
    total: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False
    )


class Meter(Base):
    """How a metric's events become a quantity: `aggregation` and the metadata it reads.

    A metric without a row is metered as `sum` of `amount`.
    """

    __tablename__ = "meters"
    __table_args__ = (
        CheckConstraint(
            "aggregation IN ('sum', 'count', 'max', 'unique_count', 'latest')", name="aggregation"
        ),
    )

    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    aggregation: Mapped[str] = mapped_column(String(16), default="sum", nullable=False)
    property: Mapped[str | None] = mapped_column(String(100), nullable=True)
    group_by: Mapped[list[str]] = mapped_column(JSON, default=list, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class Tenant(Base):
    """A tenant's settings; a tenant without a row is billed in UTC, as before tenants existed.

    `timezone` is an IANA name: the tenant's days and invoice months follow its wall clock.
    """

    __tablename__ = "tenants"
    # The scheduler fans out per zone: which tenants are not on UTC.
    __table_args__ = (Index("ix_tenants_timezone", "timezone"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    timezone: Mapped[str] = mapped_column(
        String(64), default="UTC", server_default="UTC", nullable=False
    )
    created_at: Mapped[datetime] = _created_at()


class Plan(Base):
    """A named bundle of prices and entitlements that tenants subscribe to."""

    __tablename__ = "plans"

    id: Mapped[str] = _id()
    key: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _created_at()

    entitlements: Mapped[list[PlanEntitlement]] = relationship(back_populates="plan")
    prices: Mapped[list[Price]] = relationship(back_populates="plan")


class PlanEntitlement(Base):
    """How much of `key` a plan allows per `window` (`day` or `month`)."""

    __tablename__ = "plan_entitlements"
    __table_args__ = (
        UniqueConstraint("plan_id", "key", "window"),
        CheckConstraint("\"window\" IN ('day', 'month')", name="window"),
    )

    id: Mapped[str] = _id()
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"), nullable=False)
    key: Mapped[str] = mapped_column(String(100), nullable=False)
    limit_per_window: Mapped[int] = mapped_column(BigInteger, nullable=False)
    window: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = _created_at()

    plan: Mapped[Plan] = relationship(back_populates="entitlements")


class Subscription(Base):
    """A tenant on a plan from `effective_at` until `ended_at` (open-ended when null)."""

    __tablename__ = "subscriptions"
    __table_args__ = (Index("ix_subscriptions_tenant_id", "tenant_id"),)

    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(String(64), nullable=False)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"), nullable=False)
    effective_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = _created_at()

    plan: Mapped[Plan] = relationship()


class Price(Base):
    """A fixed monthly fee (`metric` null) or a usage price of a plan, in one currency.

    Usage prices bill `per_unit` or `tiered` (`graduated` or `volume` over `tiers`), optionally
    after package rounding (`transform_divide_by`, `transform_round`). `unit_amount_decimal`,
    when set, replaces `unit_amount`. `dimensions` (`{"model": "gpt-4"}`) narrows a usage price
    to the groups of its metric whose values match (see `billing.dimensions`).
    """

    __tablename__ = "prices"
    __table_args__ = (
        CheckConstraint("billing_scheme IN ('per_unit', 'tiered')", name="billing_scheme"),
        CheckConstraint(
            "tiers_mode IS NULL OR tiers_mode IN ('graduated', 'volume')", name="tiers_mode"
        ),
        CheckConstraint(
            "transform_round IS NULL OR transform_round IN ('up', 'down')", name="transform_round"
        ),
        Index("ix_prices_plan_id", "plan_id"),
    )

    id: Mapped[str] = _id()
    key: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    unit_amount: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    metric: Mapped[str | None] = mapped_column(String(100), nullable=True)
    recurring_interval: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"), nullable=True)
    unit_amount_decimal: Mapped[Decimal | None] = mapped_column(DecimalAmount, nullable=True)
    billing_scheme: Mapped[str] = mapped_column(String(16), default="per_unit", nullable=False)
    tiers_mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    tiers: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    transform_divide_by: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    transform_round: Mapped[str | None] = mapped_column(String(8), nullable=True)
    dimensions: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)

    plan: Mapped[Plan | None] = relationship(back_populates="prices")


INVOICE_STATUSES = ("draft", "open", "paid", "void", "uncollectible")
"""Stripe's names: `draft → open → paid | void | uncollectible`; `open` means finalized."""


class Invoice(Base):
    """A tenant's bill for `[period_start, period_end)` in one currency.

    At most one invoice per (tenant, period, currency) is not void (a partial unique index), so
    voiding one frees the period for a reissue. `number` is set when it is finalized.
    `provider_status` is the status the payment provider was last brought to (`open` once the
    invoice is sent, then `paid` or `void` once told).
    """

    __tablename__ = "invoices"
    __table_args__ = (
        Index(
            "uq_invoices_not_void_tenant_id_period_currency",
            "tenant_id",
            "period_start",
            "period_end",
            "currency",
            unique=True,
            postgresql_where=text("status <> 'void'"),
            sqlite_where=text("status <> 'void'"),
        ),
        CheckConstraint(
            "status IN ('draft', 'open', 'paid', 'void', 'uncollectible')", name="status"
        ),
        Index("ix_invoices_created_at", "created_at"),  # last run, unsynced invoices
    )

    id: Mapped[str] = _id()
    tenant_id: Mapped[str] = mapped_column(String(64), nullable=False)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    status: Mapped[str] = mapped_column(String(16), default="open", nullable=False)
    total_amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    provider_invoice_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    provider_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = _created_at()
    number: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    voided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    lines: Mapped[list[InvoiceLine]] = relationship(
        back_populates="invoice",
        order_by="InvoiceLine.created_at",
        foreign_keys="InvoiceLine.invoice_id",
    )


class NumberSequence(Base):
    """The last number issued from a gapless sequence (`invoice`, `credit_note`).

    The finalizing transaction increments its row, which locks it until commit: numbers are
    taken in commit order and a rollback gives its number back.
    """

    __tablename__ = "number_sequences"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_value: Mapped[int] = mapped_column(BigInteger, nullable=False)


LINE_KINDS = ("charge", "adjustment")
"""`charge`: the invoice's own period; `adjustment`: late usage of an earlier finalized invoice."""


class InvoiceLine(Base):
    """One priced line of an invoice; `price_id` null for usage no price covers (amount 0).

    `dimensions` is the group of the metric the line bills (`{"model": "gpt-4"}`), null for
    a fixed fee and for a metric billed whole.

    An `adjustment` line bills late usage of the finalized invoice `adjusts_invoice_id`: the
    extra quantity of `metric` and what it adds to that invoice's line (see
    `billing.adjustments`).
    """

    __tablename__ = "invoice_lines"
    __table_args__ = (
        Index("ix_invoice_lines_invoice_id", "invoice_id"),
        Index("ix_invoice_lines_adjusts_invoice_id", "adjusts_invoice_id"),
        CheckConstraint("kind IN ('charge', 'adjustment')", name="kind"),
    )

    id: Mapped[str] = _id()
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"), nullable=False)
    price_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    metric: Mapped[str | None] = mapped_column(String(100), nullable=True)
    quantity: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = _created_at()
    dimensions: Mapped[dict[str, str | None] | None] = mapped_column(JSON, nullable=True)
    kind: Mapped[str] = mapped_column(
        String(16), default="charge", server_default="charge", nullable=False
    )
    adjusts_invoice_id: Mapped[str | None] = mapped_column(ForeignKey("invoices.id"), nullable=True)

    invoice: Mapped[Invoice] = relationship(back_populates="lines", foreign_keys=[invoice_id])


class CreditNote(Base):
    """An amount given back on a finalized invoice, numbered from its own gapless sequence.

    The credit notes of an invoice never add up to more than its total.
    """

    __tablename__ = "credit_notes"
    __table_args__ = (
        Index("ix_credit_notes_invoice_id", "invoice_id"),
        CheckConstraint("amount > 0", name="amount"),
    )

    id: Mapped[str] = _id()
    invoice_id: Mapped[str] = mapped_column(ForeignKey("invoices.id"), nullable=False)
    tenant_id: Mapped[str] = mapped_column(String(64), nullable=False)
    number: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _created_at()

    lines: Mapped[list[CreditNoteLine]] = relationship(
        back_populates="credit_note", order_by="CreditNoteLine.position"
    )


class CreditNoteLine(Base):
    """One line of a credit note: an amount, optionally against one line of the invoice."""

    __tablename__ = "credit_note_lines"
    __table_args__ = (
        Index("ix_credit_note_lines_credit_note_id", "credit_note_id"),
        CheckConstraint("amount > 0", name="amount"),
    )

    id: Mapped[str] = _id()
    credit_note_id: Mapped[str] = mapped_column(ForeignKey("credit_notes.id"), nullable=False)
    position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    invoice_line_id: Mapped[str | None] = mapped_column(
        ForeignKey("invoice_lines.id"), nullable=True
    )
    description: Mapped[str | None] = mapped_column(String(200), nullable=True)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    quantity: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Late units this line re-prices (a late-usage credit note's line); null otherwise."""

    credit_note: Mapped[CreditNote] = relationship(back_populates="lines")


POSTGRESQL_METADATA = MetaData(naming_convention=NAMING_CONVENTION)
"""Tables that exist on PostgreSQL only."""

usage_event_keys = Table(
    "usage_event_keys",
    POSTGRESQL_METADATA,
    Column("tenant_id", String(64), primary_key=True),
    Column("metric", String(100), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("at_ts", UTCDateTime(), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("event_id", String(36), nullable=False),
    info={"dialects": ("postgresql",)},
)
"""PostgreSQL: each usage event's idempotency key, unique across the monthly partitions of
`usage_events` (whose own unique key must hold `at_ts`), with what the duplicate check compares."""
