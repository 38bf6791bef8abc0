"""Column types and the constraint naming convention shared by every table of the project.

`UTCDateTime` makes a datetime column behave the same on SQLite and PostgreSQL: it refuses
naive datetimes on the way in and always reads back an aware UTC datetime. `ExactDecimal` keeps
sub-cent prices exact on both. `billing` reuses it
(it may depend on `webhooks`; `webhooks` depends on nothing of ours).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import DateTime, Numeric, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint and index names for every `MetaData` of the project (the migrations rely on them)."""


def new_id() -> str:
    """A fresh UUID4 as a string: the primary key of every table."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware-UTC datetime column: naive values are rejected, results are aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            raise ValueError("naive datetime given where an aware UTC datetime is required")
        moment: datetime = value.astimezone(UTC)
        # SQLite has no time zones: store UTC without an offset so text ordering is time ordering.
        return moment.replace(tzinfo=None) if dialect.name == "sqlite" else moment

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


class ExactDecimal(TypeDecorator[Decimal]):
    """A `Decimal` column that stays exact on SQLite too.

    PostgreSQL gets `NUMERIC(30, 12)`. SQLite has no decimal type: its NUMERIC columns turn
    values into 64-bit floats, so there the column is text holding the decimal's digits.
    """

    impl = Numeric(precision=30, scale=12, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(48))
        return dialect.type_descriptor(Numeric(precision=30, scale=12, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, float):
            raise TypeError("decimal amounts must be Decimal, int or str, never float")
        exact = Decimal(str(value))
        return str(exact) if dialect.name == "sqlite" else exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(str(value)) if not isinstance(value, Decimal) else value
