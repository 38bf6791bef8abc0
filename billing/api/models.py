"""Tables the HTTP API and the quotas add to the ledger: API keys and live usage counters.

They live on their own declarative base (same naming convention as `billing.models`) so that
importing them needs neither FastAPI nor the rest of the API package.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, CheckConstraint, Index, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from webhooks.sqltypes import NAMING_CONVENTION, UTCDateTime, new_id, utcnow

GRANULARITIES = ("day", "month")


class ApiBase(DeclarativeBase):
    """Declarative base of the API's tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class ApiKey(ApiBase):
    """A bearer key bound to one tenant (or to none: an operator's) and a set of scopes; only
    its SHA-256 is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant_id", "tenant_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    scopes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class UsageCounter(ApiBase):
    """A tenant's running total of one metric in one day or month of the tenant's zone.

    Kept by database triggers on `usage_events` (see `billing.counters`), so every way of
    recording usage counts, and a quota check reads one row however many events the window
    holds. Keyed by what it counts: no surrogate id, the triggers upsert on the key.
    """

    __tablename__ = "usage_counters"
    __table_args__ = (CheckConstraint("granularity IN ('day', 'month')", name="granularity"),)

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    metric: Mapped[str] = mapped_column(String(100), primary_key=True)
    granularity: Mapped[str] = mapped_column(String(16), primary_key=True)
    period_start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, nullable=False)
