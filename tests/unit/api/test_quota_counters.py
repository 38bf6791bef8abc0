"""billing.quotas without FastAPI: counters kept by triggers, entitlements, consume."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select, update

from billing import BillingService
from billing.api.models import UsageCounter
from billing.db import make_session_factory
from billing.models import Plan, PlanEntitlement, Subscription, UsageEvent
from billing.quotas import (
    QuotaStatus,
    check_quota,
    consume_quota,
    current_quotas,
    entitlement_limit,
    used_in_window,
    window_bounds,
)
from billing.tenants import set_tenant

NOW = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def counters(session) -> dict[tuple[str, str, str, datetime], int]:
    rows = session.execute(select(UsageCounter)).scalars()
    return {(r.tenant_id, r.metric, r.granularity, r.period_start): r.total for r in rows}


def expected_from_events(session) -> dict[tuple[str, str, str, datetime], int]:
    totals: dict[tuple[str, str, str, datetime], int] = {}
    for event in session.execute(select(UsageEvent)).scalars():
        for window in ("day", "month"):
            key = (event.tenant_id, event.metric, window, window_bounds(window, event.at_ts)[0])
            totals[key] = totals.get(key, 0) + event.amount
    return totals


def nonzero(mapping):
    return {k: v for k, v in mapping.items() if v != 0}


def subscribe(session, tenant="A", limits=(("tokens", "day", 100),), **times) -> Plan:
    plan = Plan(key=f"plan-{tenant}-{len(limits)}-{times.get('effective_at', '')}", name="P")
    session.add(plan)
    session.flush()
    for key, window, limit in limits:
        session.add(
            PlanEntitlement(plan_id=plan.id, key=key, window=window, limit_per_window=limit)
        )
    session.add(
        Subscription(
            tenant_id=tenant,
            plan_id=plan.id,
            effective_at=times.get("effective_at", NOW - timedelta(days=30)),
            ended_at=times.get("ended_at"),
        )
    )
    session.flush()
    return plan


def record(session, tenant="A", metric="tokens", amount=1, at=NOW, key=None):
    return BillingService(session=session, tenant_id=tenant).record_usage(
        metric=metric, amount=amount, at=at, idempotency_key=key or f"k-{amount}-{at}-{metric}"
    )


# --- windows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "now", "start", "end"),
    [
        ("day", NOW, datetime(2025, 3, 15, tzinfo=UTC), datetime(2025, 3, 16, tzinfo=UTC)),
        ("month", NOW, datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)),
        (
            "month",
            datetime(2024, 12, 31, 23, 59, tzinfo=UTC),
            datetime(2024, 12, 1, tzinfo=UTC),
            datetime(2025, 1, 1, tzinfo=UTC),
        ),
        (
            "day",
            datetime(2025, 3, 15, 1, 0, tzinfo=UTC).astimezone(UTC) + timedelta(hours=-2),
            datetime(2025, 3, 14, tzinfo=UTC),
            datetime(2025, 3, 15, tzinfo=UTC),
        ),
    ],
)
def test_windows_are_utc_days_and_months(window, now, start, end) -> None:
    assert window_bounds(window, now) == (start, end)


# --- counters ------------------------------------------------------------------------------


def test_recording_usage_counts_it_at_once_in_its_day_and_month(session) -> None:
    record(session, amount=5)
    record(session, amount=7, at=NOW + timedelta(hours=11, minutes=59))
    record(session, amount=3, at=datetime(2025, 3, 16, tzinfo=UTC))
    record(session, amount=100, tenant="B")
    assert used_in_window(session, tenant_id="A", metric="tokens", window="day", now=NOW) == 12
    assert used_in_window(session, tenant_id="A", metric="tokens", window="month", now=NOW) == 15
    assert used_in_window(session, tenant_id="B", metric="tokens", window="day", now=NOW) == 100
    assert used_in_window(session, tenant_id="A", metric="other", window="day", now=NOW) == 0


def test_used_in_window_reads_the_tenant_s_local_day(session) -> None:
    set_tenant(session, "A", timezone="America/New_York")  # UTC-4 on 15 March 2025
    record(session, amount=5, at=NOW.replace(hour=3))  # the 14th in New York
    record(session, amount=7, at=NOW.replace(hour=5))
    assert used_in_window(session, tenant_id="A", metric="tokens", window="day", now=NOW) == 7


def test_current_quotas_read_and_reset_in_the_tenant_s_local_day(session) -> None:
    subscribe(session)  # tokens: 100 a day
    set_tenant(session, "A", timezone="America/New_York")  # UTC-4 on 15 March 2025
    record(session, amount=5, at=NOW.replace(hour=3))  # the 14th in New York
    record(session, amount=7, at=NOW.replace(hour=5))
    (status,) = current_quotas(session, tenant_id="A", now=NOW)
    assert (status.used, status.reset_at) == (7, datetime(2025, 3, 16, 4, tzinfo=UTC))


def test_consume_counts_against_the_tenant_s_local_day(session) -> None:
    subscribe(session, limits=(("tokens", "day", 10),))
    set_tenant(session, "A", timezone="America/New_York")  # UTC-4 on 15 March 2025
    record(session, amount=7, at=NOW.replace(hour=3))  # the 14th in New York
    record(session, amount=6, at=NOW.replace(hour=5))  # the 15th, 01:00 there
    allowed = consume_quota(session, tenant_id="A", key="tokens", window="day", amount=4, now=NOW)
    refused = consume_quota(session, tenant_id="A", key="tokens", window="day", amount=1, now=NOW)
    assert allowed is not None
    assert refused is not None
    assert (allowed.used, allowed.allowed, refused.allowed) == (10, True, False)
    assert allowed.reset_at == datetime(2025, 3, 16, 4, tzinfo=UTC)  # New York's midnight


def test_a_duplicate_event_is_not_counted_twice(session) -> None:
    record(session, amount=5, key="same")
    record(session, amount=5, key="same")
    BillingService(session=session, tenant_id="A").record_usage_batch(
        [{"metric": "tokens", "amount": 5, "at": NOW, "idempotency_key": "same"}] * 3
    )
    assert used_in_window(session, tenant_id="A", metric="tokens", window="day", now=NOW) == 5


event_strategy = st.tuples(
    st.sampled_from(["A", "B"]),
    st.sampled_from(["tokens", "calls"]),
    st.integers(min_value=0, max_value=10**6),
    st.datetimes(
        min_value=datetime(2024, 12, 30), max_value=datetime(2025, 1, 2), timezones=st.just(UTC)
    ),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.lists(event_strategy, min_size=1, max_size=6), min_size=1, max_size=4),
    delete_some=st.booleans(),
    move_some=st.booleans(),
)
def test_counters_always_equal_the_sum_of_the_events(
    session_factory, batches, delete_some, move_some
) -> None:
    with session_factory() as session:
        service = {t: BillingService(session=session, tenant_id=t) for t in ("A", "B")}
        for n, batch in enumerate(batches):
            for tenant in ("A", "B"):
                events = [
                    {"metric": m, "amount": a, "at": at, "idempotency_key": f"{n}-{i}"}
                    for i, (t, m, a, at) in enumerate(batch)
                    if t == tenant
                ]
                if events:
                    service[tenant].record_usage_batch(events)
        if move_some:
            session.execute(
                update(UsageEvent)
                .where(UsageEvent.amount % 2 == 0)
                .values(amount=UsageEvent.amount + 1, at_ts=datetime(2025, 1, 1, tzinfo=UTC))
            )
        if delete_some:
            session.execute(delete(UsageEvent).where(UsageEvent.metric == "calls"))
        assert nonzero(counters(session)) == nonzero(expected_from_events(session))
        session.rollback()


def test_bulk_insert_select_is_counted(session) -> None:
    for i in range(3):
        record(session, amount=i + 1, key=f"seed-{i}")
    session.execute(
        UsageEvent.__table__.insert().from_select(
            ["id", "tenant_id", "metric", "amount", "at_ts", "idempotency_key", "created_at"],
            select(
                func.substr(UsageEvent.id, 2) + "x",
                UsageEvent.tenant_id,
                UsageEvent.metric,
                UsageEvent.amount,
                UsageEvent.at_ts,
                UsageEvent.idempotency_key + "-copy",
                UsageEvent.created_at,
            ),
        )
    )
    assert used_in_window(session, tenant_id="A", metric="tokens", window="day", now=NOW) == 12


# --- entitlements --------------------------------------------------------------------------


def test_no_subscription_or_no_entitlement_means_no_limit(session) -> None:
    assert check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW) is None
    subscribe(session, limits=(("tokens", "day", 10),))
    assert check_quota(session, tenant_id="A", key="tokens", window="month", now=NOW) is None
    assert check_quota(session, tenant_id="A", key="other", window="day", now=NOW) is None
    assert current_quotas(session, tenant_id="B", now=NOW) == []


def test_only_the_subscription_in_force_counts(session) -> None:
    subscribe(session, limits=(("tokens", "day", 1),), ended_at=NOW - timedelta(seconds=1))
    subscribe(session, limits=(("tokens", "day", 2),), effective_at=NOW + timedelta(seconds=1))
    assert entitlement_limit(session, tenant_id="A", key="tokens", window="day", now=NOW) is None
    subscribe(
        session,
        limits=(("tokens", "day", 3),),
        effective_at=NOW - timedelta(seconds=1),
        ended_at=NOW + timedelta(seconds=1),
    )
    assert entitlement_limit(session, tenant_id="A", key="tokens", window="day", now=NOW) == 3


def test_a_subscription_is_in_force_from_its_start_until_its_end_exclusive(session) -> None:
    subscribe(session, limits=(("tokens", "day", 5),), effective_at=NOW, ended_at=NOW + HOUR)
    assert entitlement_limit(session, tenant_id="A", key="tokens", window="day", now=NOW) == 5
    at_end = NOW + HOUR
    assert entitlement_limit(session, tenant_id="A", key="tokens", window="day", now=at_end) is None


def test_a_status_names_its_key_and_window_and_resets_in_at_least_a_second(session) -> None:
    subscribe(session, limits=(("tokens", "month", 10),))
    checked = check_quota(session, tenant_id="A", key="tokens", window="month", now=NOW)
    consumed = consume_quota(
        session, tenant_id="A", key="tokens", window="month", amount=1, now=NOW
    )
    assert checked is not None
    assert consumed is not None
    assert (checked.key, checked.window) == (consumed.key, consumed.window) == ("tokens", "month")
    reset = checked.reset_at
    assert checked.seconds_to_reset(reset - timedelta(milliseconds=500)) == 1
    assert checked.seconds_to_reset(reset - timedelta(seconds=1, milliseconds=500)) == 2
    assert checked.seconds_to_reset(reset + HOUR) == 1


def test_on_the_first_of_a_month_the_day_and_month_counters_are_read_apart(session) -> None:
    first = datetime(2025, 3, 1, 12, tzinfo=UTC)
    subscribe(session, limits=(("tokens", "day", 10), ("tokens", "month", 10)))
    record(session, amount=2, at=first)
    for window in ("day", "month"):
        assert (
            used_in_window(session, tenant_id="A", metric="tokens", window=window, now=first) == 2
        )


def test_an_unknown_window_is_refused_naming_the_windows() -> None:
    from billing.errors import InvalidUsageError

    with pytest.raises(InvalidUsageError) as raised:
        window_bounds("week", NOW)  # type: ignore[arg-type]
    assert str(raised.value) == "window must be one of ('day', 'month'), not 'week'"
    assert raised.value.field == "window"


def test_billing_quotas_has_no_other_lazy_attribute() -> None:
    import billing.quotas

    with pytest.raises(AttributeError, match="^module 'billing.quotas' has no attribute 'nope'$"):
        billing.quotas.nope  # noqa: B018


def test_a_naive_now_is_refused() -> None:
    from billing.errors import InvalidUsageError

    with pytest.raises(InvalidUsageError, match="^now must be timezone-aware$") as raised:
        window_bounds("day", NOW.replace(tzinfo=None))
    assert raised.value.field == "now"


def test_check_reports_used_remaining_and_reset(session) -> None:
    subscribe(session, limits=(("tokens", "day", 10), ("tokens", "month", 50)))
    record(session, amount=4)
    record(session, amount=20, at=NOW - timedelta(days=3))
    day = check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW)
    month = check_quota(session, tenant_id="A", key="tokens", window="month", now=NOW)
    assert (day.used, day.remaining, day.allowed) == (4, 6, True)
    assert day.reset_at == datetime(2025, 3, 16, tzinfo=UTC)
    assert day.seconds_to_reset(NOW) == 12 * 3600
    assert (month.used, month.remaining) == (24, 26)
    assert month.reset_at == datetime(2025, 4, 1, tzinfo=UTC)
    assert [(q.key, q.window, q.used) for q in current_quotas(session, tenant_id="A", now=NOW)] == [
        ("tokens", "day", 4),
        ("tokens", "month", 24),
    ]


def test_current_quotas_are_by_key_then_window_and_a_used_up_one_is_not_allowed(session) -> None:
    limits = (("tokens", "month", 50), ("calls", "month", 9), ("tokens", "day", 4))
    subscribe(session, limits=limits)
    record(session, amount=4)
    record(session, metric="calls", amount=3)
    statuses = current_quotas(session, tenant_id="A", now=NOW)
    assert [(q.key, q.window, q.used, q.allowed) for q in statuses] == [
        ("calls", "month", 3, True),
        ("tokens", "day", 4, False),
        ("tokens", "month", 4, True),
    ]


def test_a_used_up_quota_is_not_allowed(session) -> None:
    subscribe(session, limits=(("tokens", "day", 10),))
    record(session, amount=10)
    status = check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW)
    assert (status.allowed, status.remaining) == (False, 0)


# --- consume -------------------------------------------------------------------------------


def test_consume_records_usage_up_to_a_hard_limit_and_no_further(session) -> None:
    subscribe(session, limits=(("tokens", "day", 25),))
    results = [
        consume_quota(session, tenant_id="A", key="tokens", window="day", amount=10, now=NOW)
        for _ in range(3)
    ]
    assert [r.allowed for r in results] == [True, True, False]
    assert [r.used for r in results] == [10, 20, 20]
    total = session.execute(select(func.sum(UsageEvent.amount))).scalar_one()
    assert total == 20


def test_consume_may_use_up_a_hard_limit_exactly(session) -> None:
    subscribe(session, limits=(("tokens", "day", 20),))
    results = [
        consume_quota(session, tenant_id="A", key="tokens", window="day", amount=n, now=NOW)
        for n in (10, 10, 1)
    ]
    assert [(r.allowed, r.used, r.remaining) for r in results] == [
        (True, 10, 10),
        (True, 20, 0),  # used + amount == limit: allowed
        (False, 20, 0),
    ]
    assert session.execute(select(func.sum(UsageEvent.amount))).scalar_one() == 20


@pytest.mark.postgres
def test_a_second_consume_waits_for_the_first_s_lock_and_reads_its_total(
    pg_engine, while_held
) -> None:
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        subscribe(session, limits=(("tokens", "day", 15),))
    first = factory()
    first.begin()
    assert consume_quota(first, tenant_id="A", key="tokens", window="day", amount=10, now=NOW)

    def second() -> QuotaStatus:
        with factory.begin() as session:
            return consume_quota(
                session, tenant_id="A", key="tokens", window="day", amount=10, now=NOW
            )

    [status] = while_held(pg_engine, first, second)
    assert (status.allowed, status.used) == (False, 10)  # it read the committed 10, not 0
    with factory() as session:
        assert session.execute(select(func.sum(UsageEvent.amount))).scalar_one() == 10


def test_consume_with_a_soft_limit_records_and_says_it_went_over(session) -> None:
    subscribe(session, limits=(("tokens", "day", 15),))
    results = [
        consume_quota(
            session, tenant_id="A", key="tokens", window="day", amount=10, now=NOW, soft=True
        )
        for _ in range(2)
    ]
    assert [(r.allowed, r.used, r.remaining) for r in results] == [(True, 10, 5), (False, 20, 0)]
    assert session.execute(select(func.sum(UsageEvent.amount))).scalar_one() == 20


def test_consume_without_a_limit_records_and_returns_none(session) -> None:
    assert consume_quota(session, tenant_id="A", key="t", window="day", amount=3, now=NOW) is None
    assert used_in_window(session, tenant_id="A", metric="t", window="month", now=NOW) == 3


@pytest.mark.parametrize("amount", [0, -1, True, 1.5])
def test_consume_needs_a_positive_integer(session, amount) -> None:
    from billing.errors import InvalidUsageError

    with pytest.raises(InvalidUsageError, match="^consume must be a positive integer$") as raised:
        consume_quota(session, tenant_id="A", key="t", window="day", amount=amount, now=NOW)
    assert raised.value.field == "consume"


def test_importing_billing_and_the_quota_checks_does_not_import_fastapi() -> None:
    code = (
        "import sys, billing, billing.quotas, billing.api.keys, billing.api.cli, workers.cli\n"
        "assert 'fastapi' not in sys.modules, 'fastapi imported'\n"
        "from billing.quotas import require_quota\n"
        "assert 'fastapi' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
