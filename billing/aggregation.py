"""Daily usage totals under each metric's meter, computed and upserted by the database in one
statement."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import String, Table, bindparam, case, delete, literal, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.errors import InvalidUsageError
from billing.localtime import local_day
from billing.meters import MeterSpec, get_meter, group_key, grouped_quantities, quantity
from billing.models import UsageAggregate, UsageEvent
from billing.tenants import tenant_zone
from webhooks.sqltypes import UTCDateTime, new_id, utcnow

_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def utc_day_start(moment: datetime) -> datetime:
    """Midnight UTC of the UTC day that contains the aware datetime `moment`."""
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise InvalidUsageError("day_start must be a timezone-aware datetime", field="day_start")
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class DayTotal:
    """A day's aggregate as stored: the total, and the local midnight it starts at (aware, in
    the tenant's zone: `+00:00` for UTC)."""

    total: int
    day_start: datetime


def aggregate_day(session: Session, tenant_id: str, metric: str, day: datetime) -> int:
    """`aggregate_local_day`'s total."""
    return aggregate_local_day(session, tenant_id, metric, day).total


def aggregate_local_day(session: Session, tenant_id: str, metric: str, day: datetime) -> DayTotal:
    """Upsert the `day` aggregate of `metric` for the tenant's local day containing `day`
    (its UTC day for a tenant without a zone); return it and the day's start.

    The aggregate's `period_start` is the instant of the local midnight; a day across a
    daylight saving change holds the events of its 23 or 25 hours.

    The quantity follows the metric's meter (`billing.meters`: a sum unless declared
    otherwise). `INSERT … SELECT (quantity) … ON CONFLICT DO UPDATE … RETURNING total`: the
    events never leave the database, a re-run rewrites the same row, and late events are
    counted next time. `updated_at` moves only when the total changes. A meter without
    groups drops the group rows a former `group_by` left in the same statement (PostgreSQL).
    """
    utc_day_start(day)  # refuses a naive `day`
    zone = tenant_zone(session, tenant_id, lock=True)
    start, end = local_day(zone, day)
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # One run per (tenant, metric, day) at a time, each reading after the previous commits:
        # otherwise a run whose snapshot predates a late event could overwrite a newer total.
        session.execute(
            _LOCK, {"key": f"billing.aggregate:{tenant_id}:{metric}:{start.isoformat()}"}
        )
    meter = get_meter(session, metric)
    params = {
        "id": new_id(),
        "tenant_id": tenant_id,
        "metric": metric,
        "start": start,
        "end": end,
        "now": utcnow(),
    }
    total = int(session.execute(_upsert_statement(dialect, meter), params).scalar_one())
    if meter.group_by:
        _aggregate_groups(session, dialect, meter, tenant_id, start, end)
    elif dialect != "postgresql":
        session.execute(_drop_groups(), params)
    return DayTotal(total, start.astimezone(zone))


def _aggregate_groups(
    session: Session,
    dialect: str,
    meter: MeterSpec,
    tenant_id: str,
    start: datetime,
    end: datetime,
) -> None:
    """Upsert one row per group of the day (computed in SQL); drop groups no longer present
    (after the meter's `group_by` changed or was removed)."""
    events = (
        UsageEvent.tenant_id == tenant_id,
        UsageEvent.metric == meter.key,
        UsageEvent.at_ts >= start,
        UsageEvent.at_ts < end,
    )
    totals = {
        group_key(meter.group_by, row[:-1]): int(row[-1])
        for row in (session.execute(grouped_quantities(meter, *events)) if meter.group_by else ())
    }
    now = utcnow()
    rows = [
        {
            "id": new_id(),
            "tenant_id": tenant_id,
            "metric": meter.key,
            "period_start": start,
            "granularity": "day",
            "group_key": key,
            "total": total,
            "updated_at": now,
        }
        for key, total in sorted(totals.items())
    ]
    for chunk in _chunks(rows):
        session.execute(_on_conflict(_insert(dialect).values(chunk)))
    day = (
        UsageAggregate.tenant_id == tenant_id,
        UsageAggregate.metric == meter.key,
        UsageAggregate.period_start == start,
        UsageAggregate.granularity == "day",
        UsageAggregate.group_key != "",
    )
    stored = session.execute(select(UsageAggregate.group_key).where(*day)).scalars()
    for stale in _chunks(sorted(set(stored) - set(totals))):
        session.execute(delete(UsageAggregate).where(*day, UsageAggregate.group_key.in_(stale)))


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
        literal(""),
    )
    columns = ["id", "tenant_id", "metric", "period_start", "granularity", "total", "updated_at"]
    insert = _insert(dialect).from_select([*columns, "group_key"], source)
    if dialect == "postgresql" and not meter.group_by:
        insert = insert.add_cte(_drop_groups().cte("dropped_groups"))
    return _on_conflict(insert).returning(_TABLE.c.total)


def _drop_groups() -> Any:
    """Delete the day's group rows (bound like the upsert): a meter without groups has none."""
    return delete(_TABLE).where(
        _TABLE.c.tenant_id == bindparam("tenant_id", type_=String()),
        _TABLE.c.metric == bindparam("metric", type_=String()),
        _TABLE.c.period_start == bindparam("start", type_=UTCDateTime()),
        _TABLE.c.granularity == "day",
        _TABLE.c.group_key != "",
    )


_TABLE = cast(Table, UsageAggregate.__table__)
_T = TypeVar("_T")


def _chunks(items: list[_T], size: int = 500) -> list[list[_T]]:
    return [items[index : index + size] for index in range(0, len(items), size)]


def _insert(dialect: str) -> Any:
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_TABLE)


def _on_conflict(insert: Any) -> Any:
    """Rewrite the total of an existing (tenant, metric, day, group); `updated_at` moves only
    when it changes."""
    excluded = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=["tenant_id", "metric", "period_start", "granularity", "group_key"],
        set_={
            "total": excluded.total,
            "updated_at": case(
                (_TABLE.c.total != excluded.total, excluded.updated_at),
                else_=_TABLE.c.updated_at,
            ),
        },
    )
