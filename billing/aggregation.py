"""Daily usage totals, computed and upserted by the database in one statement."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, case, func, literal, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.errors import InvalidUsageError
from billing.models import UsageAggregate, UsageEvent
from webhooks.sqltypes import UTCDateTime, new_id, utcnow

DAY = timedelta(days=1)
_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def utc_day_start(moment: datetime) -> datetime:
    """Midnight UTC of the UTC day that contains the aware datetime `moment`."""
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise InvalidUsageError("day_start must be a timezone-aware datetime", field="day_start")
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def aggregate_day(session: Session, tenant_id: str, metric: str, day: datetime) -> int:
    """Upsert the `day` aggregate of `metric` for the UTC day starting at `day`; return it.

    `INSERT … SELECT SUM(amount) … ON CONFLICT DO UPDATE … RETURNING total`: the events never
    leave the database, a re-run rewrites the same row, and late events are counted next time.
    `updated_at` moves only when the total changes.
    """
    start = utc_day_start(day)
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # One run per (tenant, metric, day) at a time, each summing after the previous commits:
        # otherwise a run whose snapshot predates a late event could overwrite a newer total.
        session.execute(
            _LOCK, {"key": f"billing.aggregate:{tenant_id}:{metric}:{start.isoformat()}"}
        )
    statement = _upsert_statement(dialect)
    params = {
        "id": new_id(),
        "tenant_id": tenant_id,
        "metric": metric,
        "start": start,
        "end": start + DAY,
        "now": utcnow(),
    }
    return int(session.execute(statement, params).scalar_one())


@functools.cache
def _upsert_statement(dialect: str) -> Any:
    """Built once per dialect, with bound parameters, so SQLAlchemy compiles it once."""
    timestamp = UTCDateTime()
    start = bindparam("start", type_=timestamp)
    source = select(
        bindparam("id", type_=String()),
        bindparam("tenant_id", type_=String()),
        bindparam("metric", type_=String()),
        start,
        literal("day"),
        func.coalesce(func.sum(UsageEvent.amount), 0),
        bindparam("now", type_=timestamp),
    ).where(
        UsageEvent.tenant_id == bindparam("tenant_id"),
        UsageEvent.metric == bindparam("metric"),
        UsageEvent.at_ts >= start,
        UsageEvent.at_ts < bindparam("end", type_=timestamp),
    )
    table = cast(Table, UsageAggregate.__table__)
    insert: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    insert = insert.from_select(
        ["id", "tenant_id", "metric", "period_start", "granularity", "total", "updated_at"], source
    )
    excluded = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=["tenant_id", "metric", "period_start", "granularity"],
        set_={
            "total": excluded.total,
            "updated_at": case(
                (table.c.total != excluded.total, excluded.updated_at),
                else_=table.c.updated_at,
            ),
        },
    ).returning(table.c.total)
