"""usage_counters per local day and month of the tenant's zone (was: UTC)

Revision ID: 0019_usage_counters_local
Revises: 0018_usage_events_partitions

The triggers that keep `usage_counters` (`0003_api`) cut days and months in UTC; a tenant with
a zone (`0014_tenants`) is billed, and now limited by its quotas, in its own. The triggers now
key each event's counters by `billing_period_start(granularity, at_ts, zone)`, the start of the
tenant's local day or month as `billing.localtime` cuts it (see `billing.counters`), and the
counters of every tenant with a zone other than UTC are counted again. Tenants on UTC keep
their rows as they are.

PostgreSQL: `billing_period_start` and `billing_midnight` are SQL functions; the trigger
functions are replaced (the triggers stay) and first take each tenant's shared zone lock.
SQLite: the triggers are made again; `billing.db.make_engine` registers the function on every
connection.
"""

from __future__ import annotations

from alembic import op

from billing.counters import register_sqlite_functions

revision = "0019_usage_counters_local"
down_revision = "0018_usage_events_partitions"
branch_labels = None
depends_on = None

# The instant `day` begins on `zone`'s wall clock, as `billing.localtime.midnight` has it: of two
# instants that show that midnight (a clock set back across it) the earlier one; where the clock
# skips it, the instant at the offset before the change (PostgreSQL's own choice there).
_PG_MIDNIGHT = """
CREATE OR REPLACE FUNCTION billing_midnight(day date, zone text) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT coalesce(min(x), (day::timestamp AT TIME ZONE zone))
    FROM (
        SELECT (day::timestamp - ((y AT TIME ZONE zone) - (y AT TIME ZONE 'UTC')))
               AT TIME ZONE 'UTC' AS x
        FROM (SELECT day::timestamp AT TIME ZONE zone AS c) AS p,
             LATERAL (VALUES (c - interval '1 day'), (c), (c + interval '1 day')) AS v (y)
    ) AS candidates
    WHERE (x AT TIME ZONE zone) = day::timestamp
$$;
"""
# `billing.localtime.local_day` / `local_month`: the local day whose bounds hold the instant.
_PG_PERIOD_START = """
CREATE OR REPLACE FUNCTION billing_period_start(granularity text, moment timestamptz, zone text)
RETURNS timestamptz LANGUAGE plpgsql STABLE AS $$
DECLARE
    day date;
BEGIN
    IF zone IS NULL OR zone = 'UTC' THEN
        RETURN date_trunc(granularity, moment, 'UTC');
    END IF;
    day := (moment AT TIME ZONE zone)::date;
    WHILE billing_midnight(day, zone) > moment LOOP
        day := day - 1;
    END LOOP;
    WHILE billing_midnight(day + 1, zone) <= moment LOOP
        day := day + 1;
    END LOOP;
    IF granularity = 'month' THEN
        RETURN billing_midnight(date_trunc('month', day)::date, zone);
    END IF;
    RETURN billing_midnight(day, zone);
END
$$;
"""

# One grouped upsert per statement, as in 0003, keyed in the tenant's zone. The zone locks come
# first, in tenant order, so a zone change (`billing.tenants.set_tenant`) and these writers wait
# for each other rather than count an event in the old zone.
_PG_LOCKS = """
    PERFORM pg_advisory_xact_lock_shared(hashtextextended('billing.tenant-zone:' || tenant_id, 0))
    FROM (SELECT DISTINCT tenant_id FROM ({changes}) AS ch (tenant_id) ORDER BY 1) AS s;
"""
_PG_UPSERT = """
    INSERT INTO usage_counters AS c (tenant_id, metric, granularity, period_start, total)
    SELECT ch.tenant_id, ch.metric, g.granularity,
           CASE WHEN t.timezone IS NULL OR t.timezone = 'UTC'
                THEN date_trunc(g.granularity, ch.at_ts, 'UTC')
                ELSE billing_period_start(g.granularity, ch.at_ts, t.timezone) END,
           sum(ch.amount)::bigint
    FROM ({changes}) AS ch (tenant_id, metric, at_ts, amount)
    LEFT JOIN tenants AS t ON t.id = ch.tenant_id
    CROSS JOIN (VALUES ('day'), ('month')) AS g (granularity)
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, metric, granularity, period_start)
    DO UPDATE SET total = c.total + EXCLUDED.total;
"""
_PG_NEW = "SELECT tenant_id, metric, at_ts, amount FROM new_rows"
_PG_OLD = "SELECT tenant_id, metric, at_ts, -amount FROM old_rows"
_PG_TENANTS = {
    "usage_counters_on_insert": "SELECT tenant_id FROM new_rows",
    "usage_counters_on_delete": "SELECT tenant_id FROM old_rows",
    "usage_counters_on_update": (
        "SELECT tenant_id FROM new_rows UNION SELECT tenant_id FROM old_rows"
    ),
}
_PG_CHANGES = {
    "usage_counters_on_insert": _PG_NEW,
    "usage_counters_on_delete": _PG_OLD,
    "usage_counters_on_update": f"{_PG_NEW} UNION ALL {_PG_OLD}",
}
# 0003's bodies, for the downgrade.
_PG_UTC_UPSERT = """
    INSERT INTO usage_counters AS c (tenant_id, metric, granularity, period_start, total)
    SELECT ch.tenant_id, ch.metric, g.granularity,
           date_trunc(g.granularity, ch.at_ts, 'UTC'), sum(ch.amount)::bigint
    FROM ({changes}) AS ch (tenant_id, metric, at_ts, amount)
    CROSS JOIN (VALUES ('day'), ('month')) AS g (granularity)
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, metric, granularity, period_start)
    DO UPDATE SET total = c.total + EXCLUDED.total;
"""

# SQLite: row triggers, as in 0003, with the period from the registered function.
_SQLITE_PERIOD = (
    "billing_period_start('{granularity}', {row}.at_ts, "
    "(SELECT timezone FROM tenants WHERE id = {row}.tenant_id))"
)
_SQLITE_UTC_PERIOD = {
    "day": "strftime('%Y-%m-%d 00:00:00.000000', {row}.at_ts)",
    "month": "strftime('%Y-%m-01 00:00:00.000000', {row}.at_ts)",
}
_SQLITE_ADD = """
    INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
    VALUES ({row}.tenant_id, {row}.metric, 'day', {day}, {sign}{row}.amount)
    ON CONFLICT (tenant_id, metric, granularity, period_start)
    DO UPDATE SET total = total + excluded.total;
    INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
    VALUES ({row}.tenant_id, {row}.metric, 'month', {month}, {sign}{row}.amount)
    ON CONFLICT (tenant_id, metric, granularity, period_start)
    DO UPDATE SET total = total + excluded.total;
"""
# SQLite turns an overflowing integer sum into a float: refuse the event instead, as
# PostgreSQL does ("bigint out of range"). The month counter is the larger of the two.
_SQLITE_GUARD = """
    SELECT RAISE(ABORT, 'usage counter out of range') WHERE EXISTS (
        SELECT 1 FROM usage_counters
        WHERE tenant_id = NEW.tenant_id AND metric = NEW.metric AND granularity = 'month'
          AND period_start = {month}
          AND total > 9223372036854775807 - NEW.amount);
"""
_SQLITE_EVENTS = {
    "usage_events_counted_on_insert": "INSERT",
    "usage_events_counted_on_delete": "DELETE",
    "usage_events_counted_on_update": "UPDATE OF tenant_id, metric, at_ts, amount",
}

# The tenants whose counters are cut in a zone other than UTC, counted again.
_RECOUNT_ZONED = """
    DELETE FROM usage_counters
    WHERE tenant_id IN (SELECT id FROM tenants WHERE timezone <> 'UTC');
    INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
    SELECT e.tenant_id, e.metric, g.granularity,
           billing_period_start(g.granularity, e.at_ts, t.timezone), CAST(sum(e.amount) AS BIGINT)
    FROM usage_events AS e
    JOIN tenants AS t ON t.id = e.tenant_id AND t.timezone <> 'UTC'
    CROSS JOIN (SELECT 'day' AS granularity UNION ALL SELECT 'month') AS g
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4;
"""
_RECOUNT_ZONED_IN_UTC = """
    DELETE FROM usage_counters
    WHERE tenant_id IN (SELECT id FROM tenants WHERE timezone <> 'UTC');
    INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
    SELECT e.tenant_id, e.metric, g.granularity, {period}, CAST(sum(e.amount) AS BIGINT)
    FROM usage_events AS e
    JOIN tenants AS t ON t.id = e.tenant_id AND t.timezone <> 'UTC'
    CROSS JOIN (SELECT 'day' AS granularity UNION ALL SELECT 'month') AS g
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_MIDNIGHT)
        op.execute(_PG_PERIOD_START)
        for function, changes in _PG_CHANGES.items():
            body = _PG_LOCKS.format(changes=_PG_TENANTS[function])
            _pg_function(function, body + _PG_UPSERT.format(changes=changes))
    else:
        register_sqlite_functions(op.get_bind().connection.driver_connection)
        day = _SQLITE_PERIOD.replace("{granularity}", "day")
        month = _SQLITE_PERIOD.replace("{granularity}", "month")
        _sqlite_triggers(day, month)
    for statement in _statements(_RECOUNT_ZONED):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function, changes in _PG_CHANGES.items():
            _pg_function(function, _PG_UTC_UPSERT.format(changes=changes))
        period = "date_trunc(g.granularity, e.at_ts, 'UTC')"
    else:
        _sqlite_triggers(_SQLITE_UTC_PERIOD["day"], _SQLITE_UTC_PERIOD["month"])
        period = (
            "CASE g.granularity WHEN 'day' THEN strftime('%Y-%m-%d 00:00:00.000000', e.at_ts) "
            "ELSE strftime('%Y-%m-01 00:00:00.000000', e.at_ts) END"
        )
    for statement in _statements(_RECOUNT_ZONED_IN_UTC.format(period=period)):
        op.execute(statement)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION billing_period_start(text, timestamptz, text)")
        op.execute("DROP FUNCTION billing_midnight(date, text)")


def _pg_function(name: str, body: str) -> None:
    op.execute(
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n{body}\n    RETURN NULL;\nEND\n$$;"
    )


def _sqlite_triggers(day: str, month: str) -> None:
    """Make the three triggers again with `day` and `month` (templates over `{row}`)."""

    def add(row: str, sign: str) -> str:
        return _SQLITE_ADD.format(
            row=row, sign=sign, day=day.format(row=row), month=month.format(row=row)
        )

    bodies = {
        "usage_events_counted_on_insert": _SQLITE_GUARD.format(month=month.format(row="NEW"))
        + add("NEW", ""),
        "usage_events_counted_on_delete": add("OLD", "-"),
        "usage_events_counted_on_update": add("OLD", "-") + add("NEW", ""),
    }
    for trigger, event in _SQLITE_EVENTS.items():
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute(
            f"CREATE TRIGGER {trigger} AFTER {event} ON usage_events "
            f"FOR EACH ROW BEGIN {bodies[trigger]} END"
        )


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]
