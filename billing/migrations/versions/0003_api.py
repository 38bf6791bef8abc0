"""api: API keys, and usage counters kept by triggers on usage_events

Revision ID: 0003_api
Revises: 0002_webhooks

`usage_counters` holds, per tenant, metric and UTC day or month, the sum of the amounts of the
`usage_events` rows in it. Triggers keep it so on every INSERT, UPDATE and DELETE of events,
whichever code path writes them, so that a quota check reads one row. On PostgreSQL they are
statement-level triggers over transition tables: a 1,000-row batch (or a 10,000,000-row
`INSERT … SELECT`) costs one grouped upsert, ordered so that concurrent writers lock counter
rows in the same order (day before month), as `billing.quotas.lock_counters` does. Existing
events are counted when the migration runs.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from webhooks.sqltypes import UTCDateTime

revision = "0003_api"
down_revision = "0002_webhooks"
branch_labels = None
depends_on = None

# PostgreSQL: one grouped upsert per statement. `changes` is (tenant_id, metric, at_ts, amount).
_PG_UPSERT = """
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
_PG_NEW = "SELECT tenant_id, metric, at_ts, amount FROM new_rows"
_PG_OLD = "SELECT tenant_id, metric, at_ts, -amount FROM old_rows"

_PG_FUNCTIONS = {
    "usage_counters_on_insert": _PG_UPSERT.format(changes=_PG_NEW),
    "usage_counters_on_delete": _PG_UPSERT.format(changes=_PG_OLD),
    "usage_counters_on_update": _PG_UPSERT.format(changes=f"{_PG_NEW} UNION ALL {_PG_OLD}"),
}
_PG_TRIGGERS = {
    "usage_events_counted_on_insert": ("INSERT", "NEW TABLE AS new_rows", "on_insert"),
    "usage_events_counted_on_delete": ("DELETE", "OLD TABLE AS old_rows", "on_delete"),
    "usage_events_counted_on_update": (
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "on_update",
    ),
}

# SQLite: row triggers. Datetimes are stored as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC.
_SQLITE_ADD = """
    INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
    VALUES ({row}.tenant_id, {row}.metric, 'day',
            strftime('%Y-%m-%d 00:00:00.000000', {row}.at_ts), {sign}{row}.amount)
    ON CONFLICT (tenant_id, metric, granularity, period_start)
    DO UPDATE SET total = total + excluded.total;
    INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
    VALUES ({row}.tenant_id, {row}.metric, 'month',
            strftime('%Y-%m-01 00:00:00.000000', {row}.at_ts), {sign}{row}.amount)
    ON CONFLICT (tenant_id, metric, granularity, period_start)
    DO UPDATE SET total = total + excluded.total;
"""
# SQLite turns an overflowing integer sum into a float: refuse the event instead, as
# PostgreSQL does ("bigint out of range"). The month counter is the larger of the two.
_SQLITE_GUARD = """
    SELECT RAISE(ABORT, 'usage counter out of range') WHERE EXISTS (
        SELECT 1 FROM usage_counters
        WHERE tenant_id = NEW.tenant_id AND metric = NEW.metric AND granularity = 'month'
          AND period_start = strftime('%Y-%m-01 00:00:00.000000', NEW.at_ts)
          AND total > 9223372036854775807 - NEW.amount);
"""
_SQLITE_TRIGGERS = {
    "usage_events_counted_on_insert": (
        "INSERT",
        _SQLITE_GUARD + _SQLITE_ADD.format(row="NEW", sign=""),
    ),
    "usage_events_counted_on_delete": ("DELETE", _SQLITE_ADD.format(row="OLD", sign="-")),
    "usage_events_counted_on_update": (
        "UPDATE OF tenant_id, metric, at_ts, amount",
        _SQLITE_ADD.format(row="OLD", sign="-") + _SQLITE_ADD.format(row="NEW", sign=""),
    ),
}

_BACKFILL = {
    "postgresql": _PG_UPSERT.format(
        changes="SELECT tenant_id, metric, at_ts, amount FROM usage_events"
    ),
    "sqlite": """
        INSERT INTO usage_counters (tenant_id, metric, granularity, period_start, total)
        SELECT tenant_id, metric, 'day', strftime('%Y-%m-%d 00:00:00.000000', at_ts), sum(amount)
        FROM usage_events GROUP BY 1, 2, 3, 4
        UNION ALL
        SELECT tenant_id, metric, 'month', strftime('%Y-%m-01 00:00:00.000000', at_ts),
               sum(amount)
        FROM usage_events GROUP BY 1, 2, 3, 4;
    """,
}


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"], unique=False)
    op.create_table(
        "usage_counters",
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=100), nullable=False),
        sa.Column("granularity", sa.String(length=16), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "granularity IN ('day', 'month')", name=op.f("ck_usage_counters_granularity")
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "metric", "granularity", "period_start", name=op.f("pk_usage_counters")
        ),
    )
    dialect = op.get_bind().dialect.name
    op.execute(_BACKFILL[dialect])
    if dialect == "postgresql":
        for function, body in _PG_FUNCTIONS.items():
            op.execute(
                f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
                f"BEGIN\n{body}\n    RETURN NULL;\nEND\n$$;"
            )
        for trigger, (event, referencing, function) in _PG_TRIGGERS.items():
            op.execute(
                f"CREATE TRIGGER {trigger} AFTER {event} ON usage_events "
                f"REFERENCING {referencing} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION usage_counters_{function}()"
            )
    else:
        for trigger, (event, body) in _SQLITE_TRIGGERS.items():
            op.execute(
                f"CREATE TRIGGER {trigger} AFTER {event} ON usage_events "
                f"FOR EACH ROW BEGIN {body} END"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for trigger in _PG_TRIGGERS:
        suffix = " ON usage_events" if dialect == "postgresql" else ""
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}{suffix}")
    if dialect == "postgresql":
        for function in _PG_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    op.drop_table("usage_counters")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
