"""Races on PostgreSQL: the same event from 16 threads, two workers invoicing at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from billing import BillingService, IdempotencyConflictError
from billing.db import make_session_factory
from billing.meters import declare_meter
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription, UsageEvent
from billing.tenants import set_tenant

pytestmark = pytest.mark.postgres

AT = datetime(2025, 1, 15, tzinfo=UTC)
JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)


def test_sixteen_threads_sending_one_event_store_it_once(pg_engine, race) -> None:
    factory = make_session_factory(pg_engine)

    def send(_: int) -> str:
        with factory.begin() as session:
            bs = BillingService(session=session, tenant_id="t1")
            return bs.record_usage(metric="tokens", amount=42, at=AT, idempotency_key="req-42")

    results = race(16, send)
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    with factory() as session:
        assert session.execute(select(func.count()).select_from(UsageEvent)).scalar_one() == 1


def test_racing_a_conflicting_event_raises_a_conflict_not_an_integrity_error(
    pg_engine, race
) -> None:
    factory = make_session_factory(pg_engine)

    def send(index: int) -> str:
        with factory.begin() as session:
            bs = BillingService(session=session, tenant_id="t1")
            return bs.record_usage(metric="tokens", amount=index % 2, at=AT, idempotency_key="k")

    results = race(16, send)
    winners = {r for r in results if isinstance(r, str)}
    assert len(winners) == 1
    errors = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(e, IdempotencyConflictError) for e in errors), errors
    assert len(errors) == 8


def test_a_duplicate_does_not_roll_back_the_callers_other_work(pg_engine) -> None:
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="tokens", amount=1, at=AT, idempotency_key="k"
        )
    with factory.begin() as session:
        session.add(Plan(key="written-in-the-same-transaction", name="x"))
        session.flush()
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="tokens", amount=1, at=AT, idempotency_key="k"
        )
        session.execute(text("SELECT 1"))  # the transaction is still usable
    with factory() as session:
        assert session.execute(select(func.count()).select_from(Plan)).scalar_one() == 1


def test_concurrent_batches_overlapping_in_keys_store_each_event_once(pg_engine, race) -> None:
    factory = make_session_factory(pg_engine)

    def send(index: int) -> list[str]:
        events = [
            {"metric": "tokens", "amount": k, "at": AT, "idempotency_key": f"k{k}"}
            for k in range(index * 100, index * 100 + 500)
        ]
        with factory.begin() as session:
            return BillingService(session=session, tenant_id="t1").record_usage_batch(events)

    results = race(8, send)
    assert all(isinstance(r, list) for r in results), results
    with factory() as session:
        stored = session.execute(select(func.count()).select_from(UsageEvent)).scalar_one()
    assert stored == 700 + 500 - 100 + 100  # keys k0 .. k1199


def test_two_workers_invoicing_at_once_create_one_invoice(pg_engine, race) -> None:
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        session.add(
            Price(
                key="pro-fee",
                plan_id=plan.id,
                currency="usd",
                unit_amount=1000,
                recurring_interval="month",
            )
        )
        session.add(
            Price(key="pro-tokens", plan_id=plan.id, currency="usd", unit_amount=1, metric="tokens")
        )
        session.add(
            Subscription(tenant_id="t1", plan_id=plan.id, effective_at=JAN - timedelta(days=5))
        )
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="tokens", amount=7, at=AT, idempotency_key="k"
        )

    def generate(_: int) -> str:
        with factory.begin() as session:
            return BillingService(session=session, tenant_id="t1").generate_monthly_invoice(
                period_start=JAN, period_end=FEB, currency="usd"
            )

    results = race(8, generate)
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    with factory() as session:
        assert session.execute(select(func.count()).select_from(Invoice)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(InvoiceLine)).scalar_one() == 2
        assert session.get(Invoice, results[0]).total_amount == 1007


def test_concurrent_aggregations_of_one_day_leave_one_correct_row(pg_engine, race) -> None:
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage_batch(
            [
                {"metric": "tokens", "amount": 3, "at": AT, "idempotency_key": f"k{i}"}
                for i in range(100)
            ]
        )

    def aggregate(_: int) -> int:
        with factory.begin() as session:
            bs = BillingService(session=session, tenant_id="t1")
            return bs.aggregate_daily(metric="tokens", day_start=AT)

    assert race(8, aggregate) == [300] * 8
    with factory() as session:
        rows = session.execute(text("SELECT total FROM usage_aggregates")).scalars().all()
    assert rows == [300]


@pytest.mark.parametrize(("aggregation", "before", "after"), [("sum", 10, 12), ("latest", 10, 2)])
def test_a_run_waiting_behind_another_never_writes_an_older_total(
    pg_engine, while_held, aggregation: str, before: int, after: int
) -> None:
    """Y holds the day; X waits; a late event commits; Y re-sums and commits; X must see it.
    (A `latest` meter's X upserts in the statement that waited: `billing_aggregate_day`.)"""
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        declare_meter(session, key="tokens", aggregation=aggregation)
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="tokens", amount=10, at=AT, idempotency_key="first"
        )
    holder = factory()
    holder.begin()
    BillingService(session=holder, tenant_id="t1").aggregate_daily(metric="tokens", day_start=AT)

    def waiter() -> int:
        with factory.begin() as session:
            bs = BillingService(session=session, tenant_id="t1")
            return bs.aggregate_daily(metric="tokens", day_start=AT)

    def late_event_then_holder_reruns() -> None:  # X is now blocked behind Y
        with factory.begin() as session:
            BillingService(session=session, tenant_id="t1").record_usage(
                metric="tokens", amount=2, at=AT + timedelta(hours=1), idempotency_key="late"
            )
        assert BillingService(session=holder, tenant_id="t1").aggregate_daily(
            metric="tokens", day_start=AT
        ) in (before, after)

    assert while_held(pg_engine, holder, waiter, then=late_event_then_holder_reruns) == [after]
    with factory() as session:
        assert session.execute(text("SELECT total FROM usage_aggregates")).scalar_one() == after


def test_a_latest_day_waiting_for_a_zone_change_is_cut_in_the_new_zone(
    pg_engine, while_held
) -> None:
    """The run before read UTC, so `billing_aggregate_day` is asked for the UTC day; the zone
    changes while it waits for the zone lock: it reads the new zone after the lock and the day
    is cut in it (by the upsert sent next), not in the zone it was asked for."""
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        declare_meter(session, key="gb", aggregation="latest")
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="gb", amount=5, at=datetime(2025, 3, 8, 20, tzinfo=UTC), idempotency_key="k"
        )  # March 8 in UTC, March 9 01:45 in Kathmandu

    def aggregate() -> int:
        with factory.begin() as session:
            service = BillingService(session=session, tenant_id="t1")
            return service.aggregate_daily(metric="gb", day_start=datetime(2025, 3, 9, tzinfo=UTC))

    assert aggregate() == 0  # the UTC day of March 9
    changing = factory()
    changing.begin()
    set_tenant(changing, "t1", timezone="Asia/Kathmandu")  # holds the zone lock
    assert while_held(pg_engine, changing, aggregate) == [5]
    with factory() as session:
        rows = session.execute(text("SELECT period_start, total FROM usage_aggregates")).all()
    assert rows == [(datetime(2025, 3, 8, 18, 15, tzinfo=UTC), 5)]  # Kathmandu's March 9
