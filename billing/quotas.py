"""Plan quotas: how much of a metric a tenant may use per day or month of its time zone.

A tenant's limit comes from its active subscription (effective now, not ended; the most recent
one if several overlap) and that plan's entitlement for the metric and window. No active
subscription, or no entitlement for the key and window, means no limit (`None` below).

Windows are the tenant's local days and months (`billing.tenants`; UTC for a tenant without a
zone): a New York tenant's monthly quota resets at its midnight on the 1st. Usage is read from
`usage_counters` (`billing.counters`): one row per tenant, metric and local day or month, which
triggers on `usage_events` keep equal to the sum of the events, whichever code path inserted
them (`BillingService.record_usage`, a batch, a bulk `INSERT … SELECT`). A check therefore
reads one row however many events the window holds, and counts usage recorded a moment ago.

`consume_quota` checks and records in one transaction while holding the window's counter rows
locked (`INSERT … ON CONFLICT DO UPDATE … RETURNING`, which takes the row locks on PostgreSQL
and the write lock on SQLite), so a hard limit holds under any number of concurrent callers.

This module needs no FastAPI; `require_quota`, the FastAPI dependency built on it, is
importable from here too and loaded on first use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal, get_args

from sqlalchemy import or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.api.models import UsageCounter
from billing.counters import counter_period
from billing.errors import InvalidUsageError
from billing.meters import MAX_GROUP_BY, PROPERTY, MeterSpec, property_text, quantity
from billing.models import PlanEntitlement, Subscription, UsageEvent
from billing.service import BillingService
from billing.tenants import tenant_zone
from webhooks.sqltypes import new_id

Window = Literal["day", "month"]
#: Metadata values a quota is limited to, e.g. `{"model": "gpt-4"}`.
Group = Mapping[str, str]
WINDOWS: tuple[Window, ...] = get_args(Window)


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """A tenant's standing against one entitlement in the current window.

    `allowed` is the hard verdict: False when the request would go over the limit (a soft
    quota lets it through anyway and only warns).
    """

    key: str
    window: Window
    limit: int
    used: int
    reset_at: datetime
    allowed: bool

    @property
    def remaining(self) -> int:
        """Units left before the limit (never negative)."""
        return max(0, self.limit - self.used)

    def seconds_to_reset(self, now: datetime) -> int:
        """Whole seconds from `now` to the end of the window, rounded up (at least 1)."""
        return max(1, math.ceil((self.reset_at - now).total_seconds()))


def window_bounds(window: Window, now: datetime, tz: tzinfo = UTC) -> tuple[datetime, datetime]:
    """`[start, end)` (UTC) of the day or month of zone `tz` containing the aware `now`."""
    if now.tzinfo is None:
        raise InvalidUsageError("now must be timezone-aware", field="now")
    if window not in WINDOWS:
        raise InvalidUsageError(f"window must be one of {WINDOWS}, not {window!r}", field="window")
    return counter_period(tz, window, now)


def entitlement_limit(
    session: Session, *, tenant_id: str, key: str, window: Window, now: datetime
) -> int | None:
    """The limit of `key` per `window` on the tenant's current plan; None when unlimited."""
    limit = session.execute(
        select(PlanEntitlement.limit_per_window).where(
            PlanEntitlement.plan_id == _current_plan(tenant_id, now),
            PlanEntitlement.key == key,
            PlanEntitlement.window == window,
        )
    ).scalar_one_or_none()
    return None if limit is None else int(limit)


def current_quotas(session: Session, *, tenant_id: str, now: datetime) -> list[QuotaStatus]:
    """Every entitlement of the tenant's current plan with its usage; empty when unlimited."""
    current = _current_plan(tenant_id, now)
    entitlements = session.execute(
        select(PlanEntitlement.key, PlanEntitlement.window, PlanEntitlement.limit_per_window)
        .where(PlanEntitlement.plan_id == current)
        .order_by(PlanEntitlement.key, PlanEntitlement.window)
    ).all()
    tz = tenant_zone(session, tenant_id) if entitlements else UTC
    statuses = []
    for key, stored_window, limit in entitlements:
        window = _as_window(stored_window)
        bounds = window_bounds(window, now, tz)
        used = _used(session, tenant_id, key, window, bounds)
        statuses.append(QuotaStatus(key, window, int(limit), used, bounds[1], used < limit))
    return statuses


def used_in_window(
    session: Session,
    *,
    tenant_id: str,
    metric: str,
    window: Window,
    now: datetime,
    group: Group | None = None,
) -> int:
    """Units of `metric` the tenant has used in the current `window` of its zone (one indexed
    read); with `group`, only the events whose metadata holds those values (summed in SQL)."""
    bounds = window_bounds(window, now, tenant_zone(session, tenant_id))
    return _used(session, tenant_id, metric, window, bounds, group)


def check_quota(
    session: Session,
    *,
    tenant_id: str,
    key: str,
    window: Window,
    now: datetime,
    group: Group | None = None,
) -> QuotaStatus | None:
    """Where the tenant stands against `key` (allowed while something is left); None: no limit.

    With `group` (`{"model": "gpt-4"}`) the limit applies to that group's usage alone."""
    if group is not None:
        check_group(group)
    limit = entitlement_limit(session, tenant_id=tenant_id, key=key, window=window, now=now)
    if limit is None:
        return None
    bounds = window_bounds(window, now, tenant_zone(session, tenant_id))
    used = _used(session, tenant_id, key, window, bounds, group)
    return QuotaStatus(key, window, limit, used, bounds[1], allowed=used < limit)


def consume_quota(
    session: Session,
    *,
    tenant_id: str,
    key: str,
    window: Window,
    amount: int,
    now: datetime,
    soft: bool = False,
    group: Group | None = None,
) -> QuotaStatus | None:
    """Record `amount` units of `key` as usage if the quota has room; return the standing.

    Hard (`soft=False`): over the limit nothing is recorded and the status says
    `allowed=False`. Soft: recorded either way; `allowed` tells whether it went over. Without a
    limit the usage is recorded and None is returned. The caller commits (or rolls back) its
    transaction; the counter rows stay locked until then, which is what makes the check and the
    write one atomic step for concurrent callers.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
        raise InvalidUsageError("consume must be a positive integer", field="consume")
    if group is not None:
        check_group(group)
    limit = entitlement_limit(session, tenant_id=tenant_id, key=key, window=window, now=now)
    if limit is None:
        _record(session, tenant_id, key, amount, now, group)
        return None
    tz = tenant_zone(session, tenant_id, lock=True)
    used = lock_counters(session, tenant_id=tenant_id, metric=key, now=now, tz=tz)[window]
    bounds = window_bounds(window, now, tz)
    if group is not None:
        # Read once the metric's counters are locked: no concurrent consumer in between.
        used = _used(session, tenant_id, key, window, bounds, group)
    allowed = used + amount <= limit
    if allowed or soft:
        _record(session, tenant_id, key, amount, now, group)
        used += amount
    return QuotaStatus(key, window, limit, used, bounds[1], allowed=allowed)


def lock_counters(
    session: Session, *, tenant_id: str, metric: str, now: datetime, tz: tzinfo
) -> dict[Window, int]:
    """Create (if needed) and lock the day and month counters of `now`; return their totals.

    `tz` is the tenant's zone, read holding the tenant's shared zone lock (`tenant_zone(…,
    lock=True)`, PostgreSQL) as the `usage_events` triggers do, and before these rows: a zone
    change cannot then wait on them while their holder waits on it. Always locks day before
    month, the order the triggers update them in, so callers of different windows cannot
    deadlock.
    """
    rows = [
        {
            "tenant_id": tenant_id,
            "metric": metric,
            "granularity": window,
            "period_start": window_bounds(window, now, tz)[0],
            "total": 0,
        }
        for window in WINDOWS
    ]
    insert = _insert(session).values(rows)
    statement = insert.on_conflict_do_update(
        index_elements=["tenant_id", "metric", "granularity", "period_start"],
        set_={"total": UsageCounter.total},
    ).returning(UsageCounter.granularity, UsageCounter.total)
    return {granularity: int(total) for granularity, total in session.execute(statement)}


def _used(
    session: Session,
    tenant_id: str,
    metric: str,
    window: Window,
    bounds: tuple[datetime, datetime],
    group: Group | None = None,
) -> int:
    start, end = bounds
    if group is not None:
        where = [property_text(name) == value for name, value in check_group(group).items()]
        used = quantity(
            MeterSpec(metric),
            UsageEvent.tenant_id == tenant_id,
            UsageEvent.metric == metric,
            UsageEvent.at_ts >= start,
            UsageEvent.at_ts < end,
            *where,
        )
        return int(session.execute(select(used)).scalar_one())
    total = session.execute(
        select(UsageCounter.total).where(
            UsageCounter.tenant_id == tenant_id,
            UsageCounter.metric == metric,
            UsageCounter.granularity == window,
            UsageCounter.period_start == start,
        )
    ).scalar_one_or_none()
    return int(total or 0)


def _as_window(value: str) -> Window:
    for window in WINDOWS:
        if value == window:
            return window
    raise ValueError(f"unknown window {value!r}")  # the table's CHECK constraint forbids it


def _current_plan(tenant_id: str, now: datetime) -> Any:
    """The plan id of the tenant's subscription in force at `now` (the latest to start)."""
    return (
        select(Subscription.plan_id)
        .where(
            Subscription.tenant_id == tenant_id,
            Subscription.effective_at <= now,
            or_(Subscription.ended_at.is_(None), Subscription.ended_at > now),
        )
        .order_by(Subscription.effective_at.desc(), Subscription.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def _record(
    session: Session,
    tenant_id: str,
    metric: str,
    amount: int,
    now: datetime,
    group: Group | None = None,
) -> None:
    BillingService(session=session, tenant_id=tenant_id).record_usage(
        metric=metric,
        amount=amount,
        at=now,
        idempotency_key=f"quota:{new_id()}",
        metadata=None if group is None else dict(group),
    )


def check_group(group: object) -> Group:
    """Return `group` if it maps up to 5 metadata property names to string values.

    Raises:
        InvalidUsageError: it does not (`field="group"`).
    """
    if (
        not isinstance(group, Mapping)
        or not 0 < len(group) <= MAX_GROUP_BY
        or not all(isinstance(k, str) and PROPERTY.match(k) for k in group)
        or not all(isinstance(v, str) for v in group.values())
    ):
        raise InvalidUsageError(
            f"group must map 1 to {MAX_GROUP_BY} metadata keys to string values", field="group"
        )
    return group


def _insert(session: Session) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(UsageCounter)
    return sqlite.insert(UsageCounter)


def __getattr__(name: str) -> Any:
    # `from billing.quotas import require_quota` (the seed's spelling) without importing
    # FastAPI for everyone who only needs the checks above.
    if name == "require_quota":
        from billing.api.ratelimit import require_quota

        return require_quota
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
