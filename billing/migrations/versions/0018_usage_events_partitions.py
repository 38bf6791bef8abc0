"""usage_events partitioned by month on PostgreSQL, idempotency keys in usage_event_keys

Revision ID: 0018_usage_events_partitions
Revises: 0017_adjustment_lines

PostgreSQL only (SQLite keeps its one table). The existing table is renamed, a partitioned
`usage_events` (range of `at_ts`, see `billing.partitions`) is created with a partition for
every month that has events, the months ahead and a default one, the events are copied into it,
and the old table is dropped. `usage_event_keys` gets one row per event: its primary key
`(tenant_id, metric, idempotency_key)` keeps idempotency whole now that `usage_events`' unique
key must hold `at_ts`. The counter triggers are created on the new table after the copy, so
`usage_counters` (which already counts these events) is left as it is.

The copy runs in the migration's transaction and holds the old table's lock throughout: at
tens of millions of events, plan a maintenance window (or copy month by month beforehand).
"""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import op

from billing.partitions import (
    DEFAULT_PARTITION,
    ensure_partitions,
    month_start,
    next_month,
    partition_name,
)

revision = "0018_usage_events_partitions"
down_revision = "0017_adjustment_lines"
branch_labels = None
depends_on = None

_COLUMNS = "id, tenant_id, metric, amount, at_ts, idempotency_key, metadata_json, created_at"
_TRIGGERS = {
    "usage_events_counted_on_insert": ("INSERT", "NEW TABLE AS new_rows", "on_insert"),
    "usage_events_counted_on_delete": ("DELETE", "OLD TABLE AS old_rows", "on_delete"),
    "usage_events_counted_on_update": (
        "UPDATE",
        "OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "on_update",
    ),
}
_KEYS_TABLE = """
CREATE TABLE usage_event_keys (
    tenant_id VARCHAR(64) NOT NULL,
    metric VARCHAR(100) NOT NULL,
    idempotency_key VARCHAR(255) NOT NULL,
    at_ts TIMESTAMP WITH TIME ZONE NOT NULL,
    amount BIGINT NOT NULL,
    event_id VARCHAR(36) NOT NULL,
    CONSTRAINT pk_usage_event_keys PRIMARY KEY (tenant_id, metric, idempotency_key)
)
"""


def _events_table(name: str, partitioned: bool) -> str:
    unique = "tenant_id, metric, idempotency_key" + (", at_ts" if partitioned else "")
    key = "id, at_ts" if partitioned else "id"
    uq_name = "uq_usage_events_" + unique.replace(", ", "_")
    return f"""
CREATE TABLE {name} (
    id VARCHAR(36) NOT NULL,
    tenant_id VARCHAR(64) NOT NULL,
    metric VARCHAR(100) NOT NULL,
    amount BIGINT NOT NULL,
    at_ts TIMESTAMP WITH TIME ZONE NOT NULL,
    idempotency_key VARCHAR(255) NOT NULL,
    metadata_json JSON,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT pk_usage_events PRIMARY KEY ({key}),
    CONSTRAINT {uq_name} UNIQUE ({unique})
){" PARTITION BY RANGE (at_ts)" if partitioned else ""}
"""


def _replace_table(partitioned: bool) -> None:
    """Rename `usage_events` aside, create it anew, copy the events, drop the old one."""
    op.execute("ALTER TABLE usage_events RENAME TO usage_events_old")
    for trigger in _TRIGGERS:
        op.execute(f"DROP TRIGGER {trigger} ON usage_events_old")
    op.execute("ALTER TABLE usage_events_old RENAME CONSTRAINT pk_usage_events TO pk_old")
    for index in ("ix_usage_events_tenant_id_metric_at_ts", "ix_usage_events_at_ts"):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_old")
    op.execute(_events_table("usage_events", partitioned))
    if partitioned:
        _create_partitions()
    op.execute(f"INSERT INTO usage_events ({_COLUMNS}) SELECT {_COLUMNS} FROM usage_events_old")
    op.execute("DROP TABLE usage_events_old")
    op.create_index(
        "ix_usage_events_tenant_id_metric_at_ts", "usage_events", ["tenant_id", "metric", "at_ts"]
    )
    op.create_index("ix_usage_events_at_ts", "usage_events", ["at_ts"])
    for trigger, (event, referencing, function) in _TRIGGERS.items():
        op.execute(
            f"CREATE TRIGGER {trigger} AFTER {event} ON usage_events "
            f"REFERENCING {referencing} FOR EACH STATEMENT "
            f"EXECUTE FUNCTION usage_counters_{function}()"
        )


def _create_partitions() -> None:
    """A partition per month with events, the default one, then those `ensure_partitions` adds."""
    bind = op.get_bind()
    first, last = bind.exec_driver_sql("SELECT min(at_ts), max(at_ts) FROM usage_events_old").one()
    if first is not None:
        start = month_start(first)
        while start <= last:
            op.execute(
                f"CREATE TABLE {partition_name(start)} PARTITION OF usage_events FOR VALUES "
                f"FROM ('{start.isoformat()}') TO ('{next_month(start).isoformat()}')"
            )
            start = next_month(start)
    op.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF usage_events DEFAULT")
    ensure_partitions(bind, now=datetime.now(UTC))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _replace_table(partitioned=True)
    op.execute(_KEYS_TABLE)
    op.execute(
        "INSERT INTO usage_event_keys "
        "(tenant_id, metric, idempotency_key, at_ts, amount, event_id) "
        "SELECT tenant_id, metric, idempotency_key, at_ts, amount, id FROM usage_events"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TABLE usage_event_keys")
    _replace_table(partitioned=False)
