"""usage_counters: a zoned tenant's local periods found once per local date, not per event

Revision ID: 0020_counters_per_local_date
Revises: 0019_usage_counters_local

PostgreSQL only. Since 0019 the counter triggers called the PL/pgSQL `billing_period_start` twice
per changed row of a tenant with a zone (each call three or more `billing_midnight` queries):
a batch of 1,000 such events paid some 6,000 function queries. The triggers' one set-based
statement now finds the local midnights once per (zone, local date) among the changed rows: an
event lies in the local day of its wall-clock date when that date's midnight and the next hold
it, which is every event but those in the hour a clock is set back across midnight; those few
take `billing_period_start` as before. The periods, and so the counters, are the same.
SQLite's row triggers are unchanged. Nothing is counted again.
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0020_counters_per_local_date"
down_revision = "0019_usage_counters_local"
branch_labels = None
depends_on = None

# The trigger functions' locks, change sets and wrapper are 0019's; only the upsert differs.
_0019 = importlib.import_module("billing.migrations.versions.0019_usage_counters_local")

# Each changed row with its zone and, in a zone, its wall-clock date `d`; the local midnights of
# every (zone, d) once (`lo`, `hi`: the day's bounds; `mo`: its month's first midnight); then the
# row's day and month: `lo` and `mo` when `lo <= at_ts < hi`, else `billing_period_start`'s.
_PG_UPSERT = """
    INSERT INTO usage_counters AS c (tenant_id, metric, granularity, period_start, total)
    WITH ch AS (
        SELECT ch.tenant_id, ch.metric, ch.at_ts, ch.amount, t.timezone AS zone,
               CASE WHEN t.timezone IS NULL OR t.timezone = 'UTC' THEN NULL
                    ELSE (ch.at_ts AT TIME ZONE t.timezone)::date END AS d
        FROM ({changes}) AS ch (tenant_id, metric, at_ts, amount)
        LEFT JOIN tenants AS t ON t.id = ch.tenant_id
    ),
    dates AS MATERIALIZED (
        SELECT zone, d, billing_midnight(d, zone) AS lo, billing_midnight(d + 1, zone) AS hi,
               billing_midnight(date_trunc('month', d)::date, zone) AS mo
        FROM (SELECT DISTINCT zone, d FROM ch WHERE d IS NOT NULL) AS z
    ),
    periods AS (
        SELECT ch.tenant_id, ch.metric, ch.amount,
               CASE WHEN ch.d IS NULL THEN date_trunc('day', ch.at_ts, 'UTC')
                    WHEN dt.lo <= ch.at_ts AND ch.at_ts < dt.hi THEN dt.lo
                    ELSE billing_period_start('day', ch.at_ts, ch.zone) END AS day_start,
               CASE WHEN ch.d IS NULL THEN date_trunc('month', ch.at_ts, 'UTC')
                    WHEN dt.lo <= ch.at_ts AND ch.at_ts < dt.hi THEN dt.mo
                    ELSE billing_period_start('month', ch.at_ts, ch.zone) END AS month_start
        FROM ch LEFT JOIN dates AS dt ON dt.zone = ch.zone AND dt.d = ch.d
    )
    SELECT p.tenant_id, p.metric, g.granularity,
           CASE g.granularity WHEN 'day' THEN p.day_start ELSE p.month_start END,
           sum(p.amount)::bigint
    FROM periods AS p
    CROSS JOIN (VALUES ('day'), ('month')) AS g (granularity)
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, metric, granularity, period_start)
    DO UPDATE SET total = c.total + EXCLUDED.total;
"""


def upgrade() -> None:
    _triggers(_PG_UPSERT)


def downgrade() -> None:
    _triggers(_0019._PG_UPSERT)


def _triggers(upsert: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for function, changes in _0019._PG_CHANGES.items():
        body = _0019._PG_LOCKS.format(changes=_0019._PG_TENANTS[function])
        _0019._pg_function(function, body + upsert.format(changes=changes))
