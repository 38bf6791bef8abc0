"""`usage_counters`: each tenant's running total of a metric per local day and local month.

The triggers on `usage_events` (migrations `0003_api`, `0019_usage_counters_local`) keep one row
per tenant, metric and day or month of the tenant's zone (`billing.tenants`; UTC without a
row), `period_start` being that period's first instant in UTC as `billing.localtime` cuts it.
They find the period with the SQL function `billing_period_start(granularity, at, zone)`: a
PL/pgSQL function on PostgreSQL (whose trigger statement, since `0020_counters_per_local_date`,
reads the local midnights once per zone and wall-clock date of its rows and calls it only for
a row those midnights do not hold), and `sqlite_period_start` below on SQLite, which every
connection made by `billing.db.make_engine` registers (a connection without it cannot store
events). On PostgreSQL each trigger first takes the shared zone lock of every tenant in the
statement (`billing.tenants`), so a zone change, which takes it exclusively and re-counts the
tenant's events in the new zone (`recount`), waits for the writers of its tenant and they for
it: no event is counted in the old zone after the change.
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.orm import Session

from billing.localtime import UTC_NAME, Period, local_day, local_month, zone

Window = Literal["day", "month"]

#: How SQLAlchemy stores a datetime on SQLite (UTC, no offset): the counters' keys are text.
_SQLITE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def counter_period(tz: tzinfo, window: Window, moment: datetime) -> Period:
    """The local day or month of `tz` containing the aware instant `moment`: what a counter
    row of `window` covers."""
    return local_day(tz, moment) if window == "day" else local_month(tz, moment)


def sqlite_period_start(granularity: str, at: str, zone_name: str | None) -> str:
    """SQLite's `billing_period_start`: the stored start of the counter period holding `at`."""
    if zone_name is None or zone_name == UTC_NAME:  # most tenants: cut the stored text
        return (
            f"{at[:10]} 00:00:00.000000" if granularity == "day" else f"{at[:7]}-01 00:00:00.000000"
        )
    moment = datetime.fromisoformat(at).replace(tzinfo=UTC)
    tz = zone(zone_name)
    window: Window = "day" if granularity == "day" else "month"
    start = counter_period(tz, window, moment).start
    return start.replace(tzinfo=None).strftime(_SQLITE_FORMAT)


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """Give a SQLite connection the functions the `usage_events` triggers call."""
    dbapi_connection.create_function(
        "billing_period_start", 3, sqlite_period_start, deterministic=True
    )


def recount(session: Session, tenant_id: str) -> None:
    """Count the tenant's events again into counters of its current zone (after a change).

    Reads the zone as stored in this transaction: call it once the tenant's row is flushed.
    """
    params = {"tenant_id": tenant_id}
    session.execute(text("DELETE FROM usage_counters WHERE tenant_id = :tenant_id"), params)
    session.execute(_RECOUNT, params)


_RECOUNT = text(
    """
    INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
    SELECT e.tenant_id, e.metric, g.granularity,
           billing_period_start(g.granularity, e.at_ts, t.timezone), CAST(sum(e.amount) AS BIGINT)
    FROM usage_events AS e
    CROSS JOIN (SELECT 'day' AS granularity UNION ALL SELECT 'month') AS g
    LEFT JOIN tenants AS t ON t.id = e.tenant_id
    WHERE e.tenant_id = :tenant_id
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    """
)
