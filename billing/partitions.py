"""Monthly partitions of `usage_events` on PostgreSQL (migration 0018); SQLite has one table.

`usage_events` is partitioned by range of `at_ts`, one partition a UTC month
(`usage_events_p2025_01` holds January 2025), and a default partition (`usage_events_default`)
catches an event of a month that has none yet, so ingest never fails for want of one. The
scheduler calls `ensure_partitions` daily and on start: it creates the partitions of this month
and the next `ahead` months, and moves the rows of any month found in the default partition into
that month's new partition. A new partition is created as a table of its own and then attached,
which does not block writers of the other months; it is empty or holds only the moved rows, so
attaching it is quick.

A unique key over a partitioned table must hold the partition column, so
`UNIQUE (tenant_id, metric, idempotency_key, at_ts)` alone would let a key be reused at another
time. `usage_event_keys` (not partitioned, primary key `(tenant_id, metric, idempotency_key)`)
keeps idempotency as it was: the ledger claims each event's key there in the same statement
that stores it (see `billing.ledger`), and finds duplicates there.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import Connection, text

logger = logging.getLogger(__name__)

TABLE = "usage_events"
DEFAULT_PARTITION = "usage_events_default"
PARTITIONS_AHEAD = 3
"""Months after the current one that always have their partition."""

_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended('usage_events partitions', 0))")
_PARTITIONED = text(
    "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(:table))"
)
_PARTITIONS = text(
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass(:table)"
)
_DEFAULT_MONTHS = text(
    f"SELECT DISTINCT date_trunc('month', at_ts, 'UTC') FROM {DEFAULT_PARTITION} ORDER BY 1"
)


def month_start(moment: datetime) -> datetime:
    """The first instant (UTC) of `moment`'s month."""
    moment = moment.astimezone(UTC)
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    """The first instant of the month after the one starting at `start`."""
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def partition_name(start: datetime) -> str:
    """`usage_events_p2025_01` for the month starting at `start`."""
    return f"{TABLE}_p{start:%Y_%m}"


def is_partitioned(connection: Connection) -> bool:
    """True on PostgreSQL once migration 0018 has partitioned `usage_events`."""
    if connection.dialect.name != "postgresql":
        return False
    return bool(connection.execute(_PARTITIONED, {"table": TABLE}).scalar_one())


def ensure_partitions(
    connection: Connection, *, now: datetime, ahead: int = PARTITIONS_AHEAD
) -> list[str]:
    """Create the partitions of `now`'s month and the `ahead` months after it, and of every
    month with rows in the default partition (moving them there); return the names created.

    Safe to run at once from several processes (a transaction-level advisory lock); a no-op on
    SQLite. Runs in the caller's transaction: commit it.
    """
    if not is_partitioned(connection):
        return []
    connection.execute(_LOCK)
    existing = set(connection.execute(_PARTITIONS, {"table": TABLE}).scalars())
    months = [month_start(now)]
    for _ in range(ahead):
        months.append(next_month(months[-1]))
    months += list(connection.execute(_DEFAULT_MONTHS).scalars())
    created = []
    for start in sorted(set(months)):
        name = partition_name(start)
        if name not in existing:
            moved = _create_partition(connection, name, start)
            logger.info("created partition %s (%d events moved from the default)", name, moved)
            existing.add(name)
            created.append(name)
    return created


def _create_partition(connection: Connection, name: str, start: datetime) -> int:
    """Create `name` for the month from `start`, move that month's rows out of the default
    partition into it, and attach it; the number of rows moved."""
    bounds = {"start": start, "end": next_month(start)}
    connection.exec_driver_sql(f"CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS)")
    moved = connection.execute(
        text(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "
            "WHERE at_ts >= :start AND at_ts < :end RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved"
        ),
        bounds,
    ).rowcount
    # Literal bounds: ATTACH PARTITION takes no parameters. They come from datetimes, not input.
    connection.exec_driver_sql(
        f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES "
        f"FROM ('{bounds['start'].isoformat()}') TO ('{bounds['end'].isoformat()}')"
    )
    return int(moved or 0)
