"""The limit on distinct metrics per tenant and month (`MAX_METRICS_PER_TENANT`).

The month is the tenant's local calendar month (`billing.tenants`; UTC without a zone), as its
invoices, quotas and usage counters have it. A tenant's month has a metric once
`usage_counters` has a row for it (the `usage_events` triggers add one with the first event of
the metric in the month). When events are stored, their (month, metric) pairs are looked up in
that table, by its primary key: when every pair is there (the usual case) no lock is taken and
nothing counted. Only when a pair is new is a per-tenant lock taken (a transaction-level
advisory lock on PostgreSQL, held to commit, so concurrent senders of new metrics count one
after the other) and the months' metrics read after it: more than the limit raises
`TooManyMetricsError` and nothing is stored.
On PostgreSQL the ledger's insert does all of that itself, in its one statement (`limit_for`,
`billing.ledger.store`, migration 0024). Elsewhere `metric_guard` does it around the insert:
on SQLite, which lets one transaction write at a time, and for an autocommit batch stored in
chunks, each committing at once, where the lock is a session-level one released after the
inserts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, tzinfo

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from billing.api.models import UsageCounter
from billing.errors import TooManyMetricsError
from billing.ledger import MetricLimit, UsageInput
from billing.localtime import local_month, local_month_starts
from billing.tenants import tenant_zone

DEFAULT_MAX_METRICS_PER_TENANT = 1000
_NAMESPACE = "billing.metric_limit:"
_XACT_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
_LOCK = text("SELECT pg_advisory_lock(hashtextextended(:key, 0))")
_UNLOCK = text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))")
# Metrics looked up per statement (one bound parameter each, far under PostgreSQL's 65,535).
_CHUNK = 1000

Pair = tuple[datetime, str]


def month_of(at: datetime, tz: tzinfo = UTC) -> datetime:
    """The first instant (UTC) of the calendar month of zone `tz` holding the aware `at`."""
    return local_month(tz, at).start


def limit_for(
    session: Session, tenant_id: str, events: Sequence[UsageInput], limit: int
) -> MetricLimit:
    """The limit for `billing.ledger.store` to check as it stores `events`."""
    return MetricLimit(
        limit=limit,
        lock_key=_NAMESPACE + tenant_id,
        guard=lambda: metric_guard(session, tenant_id, events, limit),
    )


@contextmanager
def metric_guard(
    session: Session, tenant_id: str, events: Sequence[UsageInput], limit: int | None
) -> Iterator[None]:
    """Around storing `events`: refuse them if they bring a month over `limit` metrics.

    Raises:
        TooManyMetricsError: a month of the tenant would have more than `limit` distinct
            metrics; raised before anything is stored.
    """
    if limit is None or not events:
        yield
        return
    tz = tenant_zone(session, tenant_id)
    months = local_month_starts(tz, [e.at for e in events])
    pairs = {(month, e.metric) for month, e in zip(months, events, strict=True)}
    if not _new_pairs(session, tenant_id, pairs):
        yield
        return
    with _tenant_lock(session, tenant_id):
        _check(session, tenant_id, pairs, limit, tz)
        yield


def _check(session: Session, tenant_id: str, pairs: set[Pair], limit: int, tz: tzinfo) -> None:
    """Raise if the new pairs bring a month over `limit`: one look at the months' metrics."""
    held = _metrics_of(session, tenant_id, sorted({month for month, _ in pairs}))
    by_month: dict[datetime, int] = defaultdict(int)
    for month, metric in pairs:
        if metric not in held[month]:
            by_month[month] += 1
    for month, added in sorted(by_month.items()):
        count = len(held[month])
        if count + added > limit:
            raise TooManyMetricsError.over_limit(
                limit=limit, month=month, held=count, added=added, tz=tz
            )


def _new_pairs(session: Session, tenant_id: str, pairs: set[Pair]) -> set[Pair]:
    """The pairs `usage_counters` has no month row for."""
    months = sorted({month for month, _ in pairs})
    metrics = sorted({metric for _, metric in pairs})
    known: set[Pair] = set()
    for start in range(0, len(metrics), _CHUNK):
        rows = session.connection().execute(
            _KNOWN,
            {"tenant_id": tenant_id, "months": months, "metrics": metrics[start : start + _CHUNK]},
        )
        known.update((month, metric) for month, metric in rows)
    return pairs - known


# One statement whatever the batch (expanding IN lists keep its compiled form cached): the
# month rows of the batch's metrics in the batch's months, a superset of the pairs looked for.
_KNOWN = select(UsageCounter.period_start, UsageCounter.metric).where(
    UsageCounter.tenant_id == bindparam("tenant_id"),
    UsageCounter.granularity == "month",
    UsageCounter.period_start.in_(bindparam("months", expanding=True)),
    UsageCounter.metric.in_(bindparam("metrics", expanding=True)),
)


def _metrics_of(
    session: Session, tenant_id: str, months: list[datetime]
) -> dict[datetime, set[str]]:
    """The metrics each of `months` has (a month row in `usage_counters`)."""
    held: dict[datetime, set[str]] = defaultdict(set)
    rows = session.connection().execute(_HELD, {"tenant_id": tenant_id, "months": months})
    for month, metric in rows:
        held[month].add(metric)
    return held


_HELD = select(UsageCounter.period_start, UsageCounter.metric).where(
    UsageCounter.tenant_id == bindparam("tenant_id"),
    UsageCounter.granularity == "month",
    UsageCounter.period_start.in_(bindparam("months", expanding=True)),
)


@contextmanager
def _tenant_lock(session: Session, tenant_id: str) -> Iterator[None]:
    """Hold the tenant's metric lock (PostgreSQL) while the events are checked and stored."""
    if session.get_bind().dialect.name != "postgresql":
        yield
        return
    key = {"key": _NAMESPACE + tenant_id}
    connection = session.connection()
    if not getattr(connection.connection.dbapi_connection, "autocommit", False):
        session.execute(_XACT_LOCK, key)  # released at commit or rollback
        yield
        return
    session.execute(_LOCK, key)
    try:
        yield
    finally:
        session.execute(_UNLOCK, key)
