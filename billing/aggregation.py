"""Daily usage totals under each metric's meter, computed and upserted by the database in one
statement."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, case, literal, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.errors import InvalidUsageError
from billing.meters import MeterSpec, get_meter, quantity
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

    The quantity follows the metric's meter (`billing.meters`: a sum unless declared
    otherwise). `INSERT … SELECT (quantity) … ON CONFLICT DO UPDATE … RETURNING total`: the
    events never leave the database, a re-run rewrites the same row, and late events are
    counted next time. `updated_at` moves only when the total changes.
    """
    start = utc_day_start(day)
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # One run per (tenant, metric, day) at a time, each reading after the previous commits:
        # otherwise a run whose snapshot predates a late event could overwrite a newer total.
        session.execute(
            _LOCK, {"key": f"billing.aggregate:{tenant_id}:{metric}:{start.isoformat()}"}
        )
    statement = _upsert_statement(dialect, get_meter(session, metric))
    params = {
        "id": new_id(),
        "tenant_id": tenant_id,
        "metric": metric,
        "start": start,
        "end": start + DAY,
        "now": utcnow(),
    }
    return int(session.execute(statement, params).scalar_one())


@functools.lru_cache(maxsize=256)
def _upsert_statement(dialect: str, meter: MeterSpec) -> Any:
    """Built once per dialect and meter, with bound parameters, so SQLAlchemy compiles it once."""
    timestamp = UTCDateTime()
    start = bindparam("start", type_=timestamp)
    value = quantity(
        meter,
        UsageEvent.tenant_id == bindparam("tenant_id", type_=String()),
        UsageEvent.metric == bindparam("metric", type_=String()),
        UsageEvent.at_ts >= start,
        UsageEvent.at_ts < bindparam("end", type_=timestamp),
    )
    source = select(
        bindparam("id", type_=String()),
        bindparam("tenant_id", type_=String()),
        bindparam("metric", type_=String()),
        start,
        literal("day"),
        value,
        bindparam("now", type_=timestamp),
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
