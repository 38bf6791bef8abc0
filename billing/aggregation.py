"""Daily usage totals under each metric's meter, computed and upserted by the database in one
statement."""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Engine, String, Table, bindparam, case, delete, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing import driver_sql
from billing.aggregated_event import (
    USAGE_AGGREGATED,
    aggregate_event_id,
    aggregated_payload,
    event_params,
    event_row,
)
from billing.errors import InvalidUsageError
from billing.localtime import UTC_NAME, local_day
from billing.meters import MeterSpec, get_meter, group_key, grouped_quantities, quantity
from billing.models import UsageAggregate, UsageEvent
from billing.tenants import tenant_zone, zone_lock_key
from billing.tenants import zone as tenant_zone_named
from webhooks.outbox import publish, publishing_ctes
from webhooks.sqltypes import UTCDateTime, new_id, utcnow


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


def aggregate_local_day(
    session: Session, tenant_id: str, metric: str, day: datetime, *, announce: bool = False
) -> DayTotal:
    """Upsert the `day` aggregate of `metric` for the tenant's local day containing `day`
    (its UTC day for a tenant without a zone); return it and the day's start.

    The aggregate's `period_start` is the instant of the local midnight; a day across a
    daylight saving change holds the events of its 23 or 25 hours.

    The quantity follows the metric's meter (`billing.meters`: a sum unless declared
    otherwise). `INSERT … SELECT (quantity) … ON CONFLICT DO UPDATE … RETURNING total`: the
    events never leave the database, a re-run rewrites the same row, and late events are
    counted next time. `updated_at` moves only when the total changes. A meter without
    groups drops the group rows a former `group_by` left in the same statement (PostgreSQL).

    With `announce`, also publishes `billing.usage_aggregated` to the SQL outbox
    (`billing.aggregated_event`); on PostgreSQL the upsert's own statement stores it.
    """
    utc_day_start(day)  # refuses a naive `day`
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return _aggregate_on_postgresql(session, bind.engine, tenant_id, metric, day, announce)
    zone = tenant_zone(session, tenant_id, lock=True)
    start, end = local_day(zone, day)
    meter = get_meter(session, metric)
    params = _params(tenant_id, metric, start, end)
    total = int(session.execute(_upsert_statement("sqlite", meter), params).scalar_one())
    if meter.group_by:
        _aggregate_groups(session, "sqlite", meter, tenant_id, start, end)
    else:
        session.execute(_drop_groups(), params)
    result = DayTotal(total, start.astimezone(zone))
    if announce:
        event = aggregated_payload(tenant_id, metric, result.day_start.isoformat(), total)
        publish(session, USAGE_AGGREGATED, event, event_id=aggregate_event_id(event))
    return result


def _aggregate_on_postgresql(
    session: Session, engine: Engine, tenant_id: str, metric: str, day: datetime, announce: bool
) -> DayTotal:
    """`billing_aggregate_day` (migration 0022): the locks, then the zone and meter read after
    them; for a `latest` meter without groups (not announced) the upsert too, in the zone the
    tenant had at its last run here (`_ZONES`). Otherwise, or if the zone changed, a second
    statement: the upsert (and the event) under the locks.

    One run per (tenant, metric) at a time, each reading after the previous commits: otherwise
    a run whose snapshot predates a late event could overwrite a newer total. The function's
    statements each take a fresh snapshot, so the zone and meter it returns cannot predate a
    change committed while it waited for the locks (the zone cannot change once they are held).
    """
    cache_key = (_database(engine), tenant_id)
    guessed = _ZONES.get(cache_key)
    zone = tenant_zone_named(guessed or UTC_NAME)
    start, end = local_day(zone, day)
    params = {
        **_params(tenant_id, metric, start, end),
        "zone_key": zone_lock_key(tenant_id),
        "pair_key": f"billing.aggregate:{tenant_id}:{metric}",
        "upsert": not announce,
        "zone": guessed,
    }
    session.flush()  # what the caller added is counted, as `session.execute` would autoflush
    # On the driver's cursor (`billing.driver_sql`): a `latest` upsert takes a fraction of a
    # millisecond, and SQLAlchemy's work per statement was up to a tenth of the call.
    [(total, stored_zone, kind, prop, group_by)] = driver_sql.rows(session, _AGGREGATE_DAY, params)
    if total is not None:  # cut in the guessed zone, which is the stored one
        return DayTotal(int(total), start.astimezone(zone))
    meter = (
        MeterSpec(metric)
        if kind is None
        else MeterSpec(metric, kind, prop, tuple(json.loads(group_by)))
    )
    if stored_zone != guessed:
        zone = tenant_zone_named(stored_zone or UTC_NAME)
        start, end = local_day(zone, day)
        params.update(start=start, end=end)
        _remember_zone(cache_key, stored_zone)
    day_start = start.astimezone(zone)
    if announce:
        params.update(event_params(tenant_id, metric, day_start.isoformat()))
    total = _upsert_sql(meter, announce).rows(session, params)[0][0]
    if meter.group_by:
        _aggregate_groups(session, "postgresql", meter, tenant_id, start, end)
    return DayTotal(int(total), day_start)


def _database(engine: Engine) -> str:
    """The engine's database URL as text, rendered once per engine (rendering it each call was
    about 1% of a `latest` day's client time)."""
    url = _DATABASES.get(engine)
    if url is None:
        url = _DATABASES[engine] = engine.url.render_as_string()
    return url


_DATABASES: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()

#: Each (database, tenant)'s stored zone (None: no row) as its last aggregation here read it:
#: the zone `billing_aggregate_day` is asked to cut the day in, checked under the zone's lock.
#: Only a zone that parsed is kept, so a guess never raises.
_ZONES: dict[tuple[str, str], str | None] = {}


def _remember_zone(cache_key: tuple[str, str], stored_zone: str | None) -> None:
    if len(_ZONES) >= 10_000:
        _ZONES.clear()
    _ZONES[cache_key] = stored_zone


def _params(tenant_id: str, metric: str, start: datetime, end: datetime) -> dict[str, Any]:
    return {
        "id": new_id(),
        "tenant_id": tenant_id,
        "metric": metric,
        "start": start,
        "end": end,
        "now": utcnow(),
    }


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
def _upsert_sql(meter: MeterSpec, announce: bool) -> driver_sql.Compiled:
    """`_upsert_statement` on PostgreSQL, compiled for the driver's cursor."""
    return driver_sql.compiled(_upsert_statement("postgresql", meter, announce))


@functools.lru_cache(maxsize=256)
def _upsert_statement(dialect: str, meter: MeterSpec, announce: bool = False) -> Any:
    """Built once per dialect, meter and `announce`, with bound parameters, so SQLAlchemy
    compiles it once. On PostgreSQL it drops a meter without groups' group rows and, with
    `announce` (a SELECT of the total then), stores the day's event with its deliveries and
    notifies the relays."""
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
    upsert = _on_conflict(insert).returning(_TABLE.c.total)
    if dialect != "postgresql":
        return upsert
    ctes = [] if meter.group_by else [_drop_groups().cte("dropped_groups")]
    if not announce:
        return upsert.add_cte(*ctes)
    day_total = upsert.cte("day_total")
    published = publishing_ctes(event_row(day_total.c.total).select_from(day_total))
    return select(day_total.c.total, published.notify()).add_cte(
        *ctes, published.events, published.deliveries
    )


def _drop_groups() -> Any:
    """Delete the day's group rows (bound like the upsert): a meter without groups has none."""
    return delete(_TABLE).where(
        _TABLE.c.tenant_id == bindparam("tenant_id", type_=String()),
        _TABLE.c.metric == bindparam("metric", type_=String()),
        _TABLE.c.period_start == bindparam("start", type_=UTCDateTime()),
        _TABLE.c.granularity == "day",
        _TABLE.c.group_key != "",
    )


#: PostgreSQL: see `_aggregate_on_postgresql` and migration 0022. The meter's `group_by` comes
#: as text, parsed only when the upsert follows (a `latest` day's total needs no meter).
_AGGREGATE_DAY = (
    "SELECT day_total, stored_zone, meter_aggregation, meter_property, meter_group_by::text "
    "FROM billing_aggregate_day(%(zone_key)s, %(pair_key)s, %(tenant_id)s, %(metric)s, "
    "%(upsert)s, %(zone)s, %(start)s, %(end)s, %(id)s, %(now)s)"
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
