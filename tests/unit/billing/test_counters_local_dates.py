"""`usage_counters` of tenants with a zone, across DST days: each event counted in the local day
and month `billing.localtime` gives it, however it is stored (a batch, one event, or rows
changed afterwards), on SQLite and PostgreSQL.

PostgreSQL's trigger finds the local midnights once per (zone, wall-clock date) of the changed
rows (migration 0020); an event whose date's midnights do not hold it takes the per-event
function instead: a clock set back across midnight, as Antarctica/Casey's on 2010-03-04 at
15:00 UTC, from 02:00 on the 5th to 23:00 on the 4th (the only such change since 1970), so that
the hour after it shows the 4th but lies in the 5th. Events every 20 minutes cover both.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService
from billing.api.models import UsageCounter
from billing.counters import counter_period
from billing.localtime import zone
from billing.models import UsageEvent
from billing.tenants import set_tenant

STEP = timedelta(minutes=20)
# Each zone's DST changes (Santiago's at midnight; Kathmandu's +05:45 month end), from a day
# before to a day after.
WINDOWS = {
    "America/New_York": [datetime(2025, 3, 8, tzinfo=UTC), datetime(2025, 11, 1, tzinfo=UTC)],
    "Asia/Kathmandu": [datetime(2025, 2, 27, tzinfo=UTC)],
    "America/Santiago": [datetime(2025, 4, 4, tzinfo=UTC), datetime(2025, 9, 5, tzinfo=UTC)],
    "Antarctica/Casey": [datetime(2010, 3, 3, tzinfo=UTC)],
    "UTC": [datetime(2025, 2, 27, tzinfo=UTC)],
}
Key = tuple[str, str, datetime]


def instants(zone_name: str) -> list[datetime]:
    """Every 20 minutes over three days around each of the zone's windows."""
    return [start + STEP * i for start in WINDOWS[zone_name] for i in range(3 * 24 * 3)]


def expected(zone_name: str, events: list[tuple[datetime, int]]) -> Counter[Key]:
    tz = zone(zone_name)
    totals: Counter[Key] = Counter()
    for at, amount in events:
        for window in ("day", "month"):
            totals[("tokens", window, counter_period(tz, window, at).start)] += amount
    return +totals


def counted(session: Session, tenant: str) -> Counter[Key]:
    rows = session.execute(
        select(
            UsageCounter.metric,
            UsageCounter.granularity,
            UsageCounter.period_start,
            UsageCounter.total,
        ).where(UsageCounter.tenant_id == tenant)
    )
    return +Counter({(m, g, start.astimezone(UTC)): total for m, g, start, total in rows})


def usage(at: datetime, amount: int) -> dict[str, Any]:
    return {"metric": "tokens", "amount": amount, "at": at, "idempotency_key": at.isoformat()}


@pytest.mark.parametrize("zone_name", sorted(WINDOWS))
def test_counters_of_a_zoned_tenant_are_its_local_days_and_months_across_dst(
    session_factory: sessionmaker[Session], zone_name: str
) -> None:
    tenant = "zoned"
    moments = instants(zone_name)
    amounts = [1 + i % 7 for i in range(len(moments))]
    events = list(zip(moments, amounts, strict=True))
    singles, batch = events[:5], events[5:]
    with session_factory.begin() as session:
        set_tenant(session, tenant, timezone=zone_name)
    with session_factory.begin() as session:  # one batch (PostgreSQL stages it), then singles
        bs = BillingService(session=session, tenant_id=tenant)
        bs.record_usage_batch([usage(at, amount) for at, amount in batch])
    for at, amount in singles:
        with session_factory.begin() as session:
            BillingService(session=session, tenant_id=tenant).record_usage(**usage(at, amount))
    with session_factory() as session:
        assert counted(session, tenant) == expected(zone_name, events)

    # Rows changed afterwards: the update and delete triggers count by the same periods.
    moved, dropped = moments[1::10], moments[2::3]
    with session_factory.begin() as session:
        for at in moved:
            session.execute(
                update(UsageEvent)
                .where(UsageEvent.idempotency_key == at.isoformat())
                .values(at_ts=at + timedelta(minutes=50))
            )
        session.execute(
            delete(UsageEvent).where(
                UsageEvent.idempotency_key.in_([at.isoformat() for at in dropped])
            )
        )
    shifted = {at: at + timedelta(minutes=50) for at in moved}
    left = [(shifted.get(at, at), amount) for at, amount in events if at not in set(dropped)]
    with session_factory() as session:
        assert counted(session, tenant) == expected(zone_name, left)
