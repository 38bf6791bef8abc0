"""aggregate_daily: the UTC day's total, upserted in SQL, re-runnable, late events counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from billing import BillingService, InvalidUsageError
from billing.meters import declare_meter
from billing.models import UsageAggregate

DAY = datetime(2025, 1, 1, tzinfo=UTC)


def add(bs: BillingService, key: str, amount: int, at: datetime, metric: str = "tokens") -> None:
    bs.record_usage(metric=metric, amount=amount, at=at, idempotency_key=key)


def aggregates(session) -> list[UsageAggregate]:
    return list(session.execute(select(UsageAggregate)).scalars())


def test_aggregate_sums_the_utc_day_only(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    add(bs, "before", 1000, DAY - timedelta(microseconds=1))
    add(bs, "first", 1, DAY)
    add(bs, "noon", 10, DAY + timedelta(hours=12))
    add(bs, "last", 100, DAY + timedelta(days=1) - timedelta(microseconds=1))
    add(bs, "after", 1000, DAY + timedelta(days=1))
    add(bs, "other-metric", 1000, DAY, metric="calls")
    add(BillingService(session=session, tenant_id="t2"), "other-tenant", 1000, DAY)
    assert bs.aggregate_daily(metric="tokens", day_start=DAY) == 111
    (row,) = [a for a in aggregates(session) if a.tenant_id == "t1"]
    assert (row.metric, row.period_start, row.granularity, row.total) == ("tokens", DAY, "day", 111)


def test_any_moment_of_the_day_in_any_offset_selects_that_utc_day(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    add(bs, "a", 5, DAY + timedelta(hours=3))
    # 2025-01-01 20:00 at UTC-3 is 23:00 UTC on 2025-01-01.
    moment = datetime(2025, 1, 1, 20, 0, tzinfo=timezone(timedelta(hours=-3)))
    assert bs.aggregate_daily(metric="tokens", day_start=moment) == 5
    assert aggregates(session)[0].period_start == DAY


@pytest.mark.parametrize("aggregation", ["sum", "latest"])
def test_running_it_again_gives_the_same_single_row(session, aggregation: str) -> None:
    declare_meter(session, key="tokens", aggregation=aggregation)  # latest: billing_aggregate_day
    bs = BillingService(session=session, tenant_id="t1")
    add(bs, "a", 5, DAY)
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    first = aggregates(session)[0]
    first_id, first_updated = first.id, first.updated_at
    assert bs.aggregate_daily(metric="tokens", day_start=DAY) == 5
    session.expire_all()
    (row,) = aggregates(session)
    assert (row.id, row.total, row.updated_at) == (first_id, 5, first_updated)


@pytest.mark.parametrize(("aggregation", "after"), [("sum", 12), ("latest", 7)])
def test_late_events_are_counted_on_the_next_run_and_move_updated_at(
    session, aggregation: str, after: int
) -> None:
    declare_meter(session, key="tokens", aggregation=aggregation)
    bs = BillingService(session=session, tenant_id="t1")
    add(bs, "a", 5, DAY)
    bs.aggregate_daily(metric="tokens", day_start=DAY)
    before = aggregates(session)[0].updated_at
    add(bs, "late", 7, DAY + timedelta(hours=23))
    assert bs.aggregate_daily(metric="tokens", day_start=DAY) == after
    session.expire_all()
    (row,) = aggregates(session)
    assert row.total == after
    assert row.updated_at > before


def test_a_day_without_events_aggregates_to_zero(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    assert bs.aggregate_daily(metric="tokens", day_start=DAY) == 0
    assert aggregates(session)[0].total == 0


def test_a_naive_day_is_refused(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    with pytest.raises(InvalidUsageError):
        bs.aggregate_daily(metric="tokens", day_start=datetime(2025, 1, 1))
    assert aggregates(session) == []


@pytest.mark.parametrize("metric", ["", "m" * 101])
def test_an_empty_or_over_long_metric_is_refused_as_the_metric_field(session, metric) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    with pytest.raises(InvalidUsageError) as raised:
        bs.aggregate_daily(metric=metric, day_start=DAY)
    assert raised.value.field == "metric"
    assert aggregates(session) == []
