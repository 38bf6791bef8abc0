"""Daily usage totals, computed and upserted by the database in one statement."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.errors import InvalidUsageError
from billing.models import UsageAggregate, UsageEvent
from webhooks.sqltypes import UTCDateTime, new_id, utcnow

DAY = timedelta(days=1)


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
    now = utcnow()
    total = func.coalesce(func.sum(UsageEvent.amount), 0)
    source = select(
        literal(new_id()),
        literal(tenant_id),
        literal(metric),
        literal(start, UTCDateTime()),
        literal("day"),
        total,
        literal(now, UTCDateTime()),
    ).where(
        UsageEvent.tenant_id == tenant_id,
        UsageEvent.metric == metric,
        UsageEvent.at_ts >= start,
        UsageEvent.at_ts < start + DAY,
    )
    insert = _insert(session).from_select(
        ["id", "tenant_id", "metric", "period_start", "granularity", "total", "updated_at"], source
    )
    excluded = insert.excluded
    upsert = insert.on_conflict_do_update(
        index_elements=["tenant_id", "metric", "period_start", "granularity"],
        set_={
            "total": excluded.total,
            "updated_at": case(
                (UsageAggregate.total != excluded.total, excluded.updated_at),
                else_=UsageAggregate.updated_at,
            ),
        },
    ).returning(UsageAggregate.total)
    return int(session.execute(upsert).scalar_one())


def _insert(session: Session) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(UsageAggregate)
    return sqlite.insert(UsageAggregate)
