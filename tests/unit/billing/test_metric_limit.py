"""MAX_METRICS_PER_TENANT: at most that many distinct metrics per tenant and UTC month."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from billing import BillingService, TooManyMetricsError
from billing.metric_limit import DEFAULT_MAX_METRICS_PER_TENANT, month_of
from billing.models import UsageEvent
from billing.tenants import set_tenant

AT = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


def events(count: int, *, at: datetime = AT, prefix: str = "m") -> list[dict]:
    return [
        {"metric": f"{prefix}{i}", "amount": 1, "at": at, "idempotency_key": f"{prefix}{i}"}
        for i in range(count)
    ]


def stored(session, tenant: str = "t1") -> int:
    query = select(func.count()).select_from(UsageEvent).where(UsageEvent.tenant_id == tenant)
    return session.execute(query).scalar_one()


def service(session, tenant: str = "t1", **options) -> BillingService:
    return BillingService(session=session, tenant_id=tenant, **options)


def test_the_default_limit_takes_1000_metrics_and_refuses_the_1001st(session) -> None:
    assert DEFAULT_MAX_METRICS_PER_TENANT == 1000
    bs = service(session)
    bs.record_usage_batch(events(1000))
    with pytest.raises(TooManyMetricsError) as caught:
        bs.record_usage(metric="one-more", amount=1, at=AT, idempotency_key="k")
    assert caught.value.limit == 1000
    assert caught.value.month == datetime(2025, 1, 1, tzinfo=UTC)
    assert "MAX_METRICS_PER_TENANT is 1000" in str(caught.value)
    assert stored(session) == 1000


def test_at_the_limit_the_months_metrics_are_still_taken(session) -> None:
    bs = service(session, max_metrics_per_tenant=3)
    bs.record_usage_batch(events(3))
    later = AT + timedelta(days=10)
    bs.record_usage(metric="m0", amount=5, at=later, idempotency_key="again")
    bs.record_usage_batch(
        [{"metric": "m2", "amount": 1, "at": later, "idempotency_key": "again-2"}]
    )
    assert stored(session) == 5


def test_a_batch_over_the_limit_stores_none_of_its_events(session) -> None:
    bs = service(session, max_metrics_per_tenant=3)
    bs.record_usage_batch(events(2))
    batch = [*events(2), *events(2, prefix="new")]  # two known metrics, two new ones
    with pytest.raises(TooManyMetricsError):
        bs.record_usage_batch(batch)
    assert stored(session) == 2
    bs.record_usage_batch(batch[:3])  # one new metric fits
    assert stored(session) == 3


def test_the_limit_is_per_utc_calendar_month_of_the_event_time(session) -> None:
    bs = service(session, max_metrics_per_tenant=2)
    bs.record_usage_batch(events(2, at=datetime(2025, 1, 31, 23, 59, 59, 999999, tzinfo=UTC)))
    # 00:30 on 1 February at UTC+1 is still January in UTC: refused.
    paris = timezone(timedelta(hours=1))
    with pytest.raises(TooManyMetricsError):
        bs.record_usage(
            metric="x", amount=1, at=datetime(2025, 2, 1, 0, 30, tzinfo=paris), idempotency_key="x"
        )
    bs.record_usage(metric="x", amount=1, at=datetime(2025, 2, 1, tzinfo=UTC), idempotency_key="x")
    feb = [
        {
            "metric": "m0",
            "amount": 1,
            "at": datetime(2025, 2, 2, tzinfo=UTC),
            "idempotency_key": "f",
        }
    ]
    bs.record_usage_batch(feb)  # February's second metric
    with pytest.raises(TooManyMetricsError):
        bs.record_usage(
            metric="y", amount=1, at=datetime(2025, 2, 9, tzinfo=UTC), idempotency_key="y"
        )
    assert stored(session) == 4


def test_one_tenants_metrics_do_not_count_against_another(session) -> None:
    service(session, "A", max_metrics_per_tenant=2).record_usage_batch(events(2))
    service(session, "B", max_metrics_per_tenant=2).record_usage_batch(events(2, prefix="b"))
    assert (stored(session, "A"), stored(session, "B")) == (2, 2)


def test_a_batch_of_one_month_over_the_limit_is_refused_even_if_another_month_fits(
    session,
) -> None:
    bs = service(session, max_metrics_per_tenant=2)
    batch = [*events(1), *events(3, at=datetime(2025, 2, 3, tzinfo=UTC), prefix="feb")]
    with pytest.raises(TooManyMetricsError) as caught:
        bs.record_usage_batch(batch)
    assert caught.value.month == datetime(2025, 2, 1, tzinfo=UTC)
    assert stored(session) == 0


def test_a_refusal_names_the_month_its_metrics_and_the_ones_added(session) -> None:
    """The first month over the limit, in the tenant's zone: January has 2 of 3 metrics and
    gets 2 new ones; February, later in the batch, also goes over."""
    bs = service(session, max_metrics_per_tenant=3)
    bs.record_usage_batch([*events(2), *events(1, prefix="feb", at=AT + timedelta(days=20))])
    batch = [
        *events(4, prefix="new", at=AT + timedelta(days=20)),
        *events(3, prefix="n", at=AT + timedelta(days=1)),
        *events(2),
    ]
    with pytest.raises(TooManyMetricsError) as caught:
        bs.record_usage_batch(batch)
    assert str(caught.value) == (
        "the tenant has 2 distinct metrics in 2025-01 (UTC) and these events add 3: "
        "MAX_METRICS_PER_TENANT is 3"
    )
    assert (caught.value.limit, caught.value.month) == (3, datetime(2025, 1, 1, tzinfo=UTC))
    assert stored(session) == 3


def test_a_zoned_tenants_refusal_names_its_local_month(session) -> None:
    """05:00 UTC on February 1st is midnight in New York: February there, January in UTC."""
    set_tenant(session, "t1", timezone="America/New_York")
    bs = service(session, max_metrics_per_tenant=1)
    feb = datetime(2025, 2, 1, 5, tzinfo=UTC)
    bs.record_usage(metric="tokens", amount=1, at=feb, idempotency_key="a")
    bs.record_usage(metric="calls", amount=1, at=feb - timedelta(seconds=1), idempotency_key="b")
    with pytest.raises(TooManyMetricsError) as caught:
        bs.record_usage(metric="calls", amount=1, at=feb, idempotency_key="c")
    assert str(caught.value) == (
        "the tenant has 1 distinct metrics in 2025-02 (America/New_York) and these events add "
        "1: MAX_METRICS_PER_TENANT is 1"
    )
    assert caught.value.month == feb
    assert caught.value.month.tzinfo is UTC  # the instant in UTC, not in the host's zone
    assert stored(session) == 2


def test_without_a_limit_any_number_of_metrics_is_taken(session) -> None:
    service(session, max_metrics_per_tenant=None).record_usage_batch(events(1001))
    assert stored(session) == 1001


def test_duplicates_of_stored_events_are_answered_at_the_limit(session) -> None:
    bs = service(session, max_metrics_per_tenant=1)
    first = bs.record_usage(metric="m", amount=1, at=AT, idempotency_key="k")
    assert bs.record_usage(metric="m", amount=1, at=AT, idempotency_key="k") == first


def test_month_of_is_the_first_utc_instant_of_the_month() -> None:
    tokyo = timezone(timedelta(hours=9))
    assert month_of(datetime(2025, 3, 1, 8, 0, tzinfo=tokyo)) == datetime(2025, 2, 1, tzinfo=UTC)
    assert month_of(datetime(2025, 12, 31, 23, 59, tzinfo=UTC)) == datetime(2025, 12, 1, tzinfo=UTC)
