"""Late usage: an event whose time falls in a period that already has a finalized invoice.

A period is closed for an event when any invoice of its tenant that is finalized and not void
(`open`, `paid` or `uncollectible`) covers the event's time, `period_start <= at < period_end`,
whatever the invoice's currency (an event has none). A draft does not close its period: it is
re-priced until it is finalized. What becomes of a late event is the deployment's
`LATE_USAGE` policy:

- `next_invoice` (default): stored; the tenant's next invoice in each currency bills what it
  adds to the finalized invoices of the last `LATE_USAGE_LOOKBACK` (see `billing.adjustments`);
- `reject`: refused with `PeriodClosedError`, nothing stored (a retry of an event stored before
  the period closed is still answered as a duplicate);
- `ignore`: stored, counted in `billing_late_usage_ignored_total`, billed nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from billing.errors import PeriodClosedError
from billing.models import Invoice, UsageEvent

LateUsage = Literal["next_invoice", "reject", "ignore"]
"""The `LATE_USAGE` policies."""

DEFAULT_LOOKBACK = timedelta(days=35)
"""`LATE_USAGE_LOOKBACK`: how far back (by period end; a reissue's also by when it was
finalized) finalized invoices are re-priced."""

FINALIZED = ("open", "paid", "uncollectible")
"""Statuses of an invoice that closes its period: finalized and not void."""
KEY_CHUNK = 500


@dataclass(frozen=True, slots=True)
class ClosedPeriod:
    """The period of a finalized invoice: `[start, end)`."""

    start: datetime
    end: datetime

    def covers(self, at: datetime) -> bool:
        """Whether `at` falls in the period (its end belongs to the next one)."""
        return self.start <= at < self.end


def closed_periods(
    session: Session, tenant_id: str, times: Sequence[datetime]
) -> list[ClosedPeriod]:
    """The tenant's closed periods that overlap `[min(times), max(times)]`, oldest first."""
    if not times:
        return []
    rows = session.execute(
        select(Invoice.period_start, Invoice.period_end)
        .where(
            Invoice.tenant_id == tenant_id,
            Invoice.status.in_(FINALIZED),
            Invoice.period_start <= max(times),
            Invoice.period_end > min(times),
        )
        .distinct()
        .order_by(Invoice.period_start, Invoice.period_end)
    )
    return [ClosedPeriod(start, end) for start, end in rows]


def late_indexes(
    session: Session, tenant_id: str, times: Sequence[datetime]
) -> dict[int, ClosedPeriod]:
    """For each time that falls in a closed period, its index and that period."""
    periods = closed_periods(session, tenant_id, times)
    late: dict[int, ClosedPeriod] = {}
    for index, at in enumerate(times):
        period = next((p for p in periods if p.covers(at)), None)
        if period is not None:
            late[index] = period
    return late


def stored_keys(
    session: Session, tenant_id: str, keys: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Which (metric, idempotency key) pairs the tenant has stored already."""
    found: set[tuple[str, str]] = set()
    for start in range(0, len(keys), KEY_CHUNK):
        chunk = keys[start : start + KEY_CHUNK]
        rows = session.execute(
            select(UsageEvent.metric, UsageEvent.idempotency_key).where(
                UsageEvent.tenant_id == tenant_id,
                or_(
                    *(
                        and_(UsageEvent.metric == m, UsageEvent.idempotency_key == k)
                        for m, k in chunk
                    )
                ),
            )
        )
        found.update((metric, key) for metric, key in rows)
    return found


def period_closed(period: ClosedPeriod, at: datetime, *, index: int | None) -> PeriodClosedError:
    """The refusal of an event at `at` (`events[index]` of a batch) in a closed period."""
    where = "" if index is None else f"events[{index}]: "
    return PeriodClosedError(
        f"{where}the period {period.start.isoformat()} to {period.end.isoformat()} has a "
        f"finalized invoice; usage at {at.isoformat()} is refused (LATE_USAGE=reject)",
        period_start=period.start,
        period_end=period.end,
        index=index,
    )
