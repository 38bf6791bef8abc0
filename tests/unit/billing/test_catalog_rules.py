"""Catalogue and subscription rules hold for the Python API, not only over HTTP: nothing stored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from billing import InvalidSubscriptionError, PriceDefinitionError, SubscriptionConflictError
from billing.db import make_session_factory
from billing.models import Plan, Price, Subscription

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)


def count(session, model) -> int:
    return session.execute(select(func.count()).select_from(model)).scalar_one()


@pytest.fixture
def plan_id(session_factory) -> str:
    with session_factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        return plan.id


def add_price(session_factory, plan_id, **fields) -> None:
    fields = {"key": "p", "currency": "usd", "plan_id": plan_id, **fields}
    with session_factory.begin() as session:
        session.add(Price(**fields))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"unit_amount": -1, "recurring_interval": "month"}, "unit_amount"),  # negative fixed fee
        ({"metric": "tokens", "unit_amount": -100}, "unit_amount"),
        ({"metric": "tokens", "unit_amount": 2**63}, "unit_amount"),
        ({"metric": "tokens", "unit_amount_decimal": Decimal("-0.0002")}, "unit_amount_decimal"),
        (
            {"metric": "tokens", "unit_amount_decimal": Decimal("0.0000000000001")},  # 13 places
            "unit_amount_decimal",
        ),
        ({"metric": "tokens", "unit_amount_decimal": Decimal("1e18")}, "unit_amount_decimal"),
        ({"metric": "tokens", "unit_amount_decimal": Decimal("NaN")}, "unit_amount_decimal"),
        (
            {
                "metric": "calls",
                "billing_scheme": "tiered",
                "tiers_mode": "graduated",
                "tiers": [{"up_to": 10}, {"up_to": 10}, {"up_to": None}],  # equal bounds
            },
            "tiers",
        ),
        (
            {
                "metric": "calls",
                "billing_scheme": "tiered",
                "tiers_mode": "volume",
                "tiers": [{"up_to": None, "unit_amount_decimal": "1", "flat_amount": -5}],
            },
            "tiers",
        ),
        ({"metric": "gb", "unit_amount": 5, "transform_divide_by": 0}, "transform_divide_by"),
    ],
)
def test_a_malformed_price_is_refused_and_not_stored(
    session_factory, plan_id, fields, field
) -> None:
    with pytest.raises(PriceDefinitionError) as caught:
        add_price(session_factory, plan_id, **fields)
    assert caught.value.field == field
    with session_factory() as session:
        assert count(session, Price) == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"unit_amount": 0, "recurring_interval": "month"},
        {"metric": "tokens", "unit_amount": 2**63 - 1},
        {"metric": "tokens", "unit_amount_decimal": Decimal("0.000000000001")},  # 12 places
        {"metric": "tokens", "unit_amount_decimal": Decimal("0.1000000000000")},  # trailing zeros
        {"metric": "tokens", "unit_amount_decimal": Decimal("999999999999999999.5")},
    ],
)
def test_prices_at_the_bounds_are_stored_exactly(session_factory, plan_id, fields) -> None:
    add_price(session_factory, plan_id, **fields)
    with session_factory() as session:
        price = session.execute(select(Price)).scalar_one()
        stored = {name: getattr(price, name) for name in fields}
    assert stored == fields


def test_changing_a_stored_price_is_checked_too(session_factory, plan_id) -> None:
    add_price(session_factory, plan_id, metric="tokens", unit_amount=5)
    with pytest.raises(PriceDefinitionError), session_factory.begin() as session:
        session.execute(select(Price)).scalar_one().unit_amount = -5
    with session_factory() as session:
        assert session.execute(select(Price.unit_amount)).scalar_one() == 5


def subscribe(session_factory, plan_id, start, end=None, tenant="acme") -> None:
    with session_factory.begin() as session:
        session.add(
            Subscription(tenant_id=tenant, plan_id=plan_id, effective_at=start, ended_at=end)
        )


def periods(session_factory):
    with session_factory() as session:
        rows = session.execute(
            select(
                Subscription.tenant_id, Subscription.effective_at, Subscription.ended_at
            ).order_by(Subscription.tenant_id, Subscription.effective_at)
        ).all()
    return [tuple(row) for row in rows]


def test_a_subscription_ending_before_it_starts_is_refused(session_factory, plan_id) -> None:
    with pytest.raises(InvalidSubscriptionError) as caught:
        subscribe(session_factory, plan_id, FEB, JAN)
    assert caught.value.field == "ended_at"
    assert periods(session_factory) == []


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (JAN + timedelta(days=10), None),  # inside an open-ended one
        (JAN - timedelta(days=10), JAN + timedelta(seconds=1)),  # across its start
        (JAN - timedelta(days=10), None),  # around it
    ],
)
def test_overlapping_subscriptions_of_a_tenant_are_refused(
    session_factory, plan_id, start, end
) -> None:
    subscribe(session_factory, plan_id, JAN)
    with pytest.raises(SubscriptionConflictError, match="overlaps") as caught:
        subscribe(session_factory, plan_id, start, end)
    assert caught.value.field == "effective_at"
    with session_factory() as session:
        assert caught.value.existing_id == session.execute(select(Subscription.id)).scalar_one()
    assert periods(session_factory) == [("acme", JAN, None)]


def test_back_to_back_subscriptions_and_other_tenants_do_not_overlap(
    session_factory, plan_id
) -> None:
    subscribe(session_factory, plan_id, JAN, FEB)
    subscribe(session_factory, plan_id, FEB, MAR)  # a plan change: the next starts as one ends
    subscribe(session_factory, plan_id, JAN, tenant="globex")
    subscribe(session_factory, plan_id, JAN, JAN)  # empty: cancelled at its start
    assert len(periods(session_factory)) == 4


def test_ending_one_and_starting_the_next_in_one_flush_is_a_plan_change(
    session_factory, plan_id
) -> None:
    subscribe(session_factory, plan_id, JAN)
    with session_factory.begin() as session:
        session.execute(select(Subscription)).scalar_one().ended_at = FEB
        session.add(Subscription(tenant_id="acme", plan_id=plan_id, effective_at=FEB))
    assert periods(session_factory) == [("acme", JAN, FEB), ("acme", FEB, None)]


def test_two_overlapping_subscriptions_added_together_are_refused(session_factory, plan_id) -> None:
    with pytest.raises(InvalidSubscriptionError), session_factory.begin() as session:
        session.add_all(
            [
                Subscription(tenant_id="acme", plan_id=plan_id, effective_at=JAN),
                Subscription(tenant_id="acme", plan_id=plan_id, effective_at=FEB),
            ]
        )
    assert periods(session_factory) == []


def end_at(session_factory, start, end) -> None:
    with session_factory.begin() as session:
        sub = session.execute(select(Subscription).where(Subscription.effective_at == start))
        sub.scalar_one().ended_at = end


def test_extending_a_subscription_over_the_next_one_is_refused(session_factory, plan_id) -> None:
    subscribe(session_factory, plan_id, JAN, FEB)
    subscribe(session_factory, plan_id, FEB)
    with pytest.raises(InvalidSubscriptionError):
        end_at(session_factory, JAN, None)
    assert periods(session_factory) == [("acme", JAN, FEB), ("acme", FEB, None)]


@pytest.fixture
def pg_plan(pg_engine) -> tuple[object, str]:
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        return factory, plan.id


@pytest.mark.postgres
def test_a_second_session_waits_for_the_first_s_subscription_then_sees_the_overlap(
    pg_engine, pg_plan, while_held
) -> None:
    factory, plan_id = pg_plan
    first = factory()
    first.begin()
    first.add(Subscription(tenant_id="acme", plan_id=plan_id, effective_at=JAN))
    first.flush()  # checked, and holds the tenant's lock until it commits

    def second() -> str:
        try:
            subscribe(factory, plan_id, JAN + timedelta(days=10))
        except InvalidSubscriptionError:
            return "refused"
        return "stored"

    assert while_held(pg_engine, first, second) == ["refused"]
    assert periods(factory) == [("acme", JAN, None)]


@pytest.mark.postgres
def test_concurrent_overlapping_subscriptions_on_postgresql_store_one(pg_plan, race) -> None:
    factory, plan_id = pg_plan

    def add(n: int) -> str:
        try:
            subscribe(factory, plan_id, JAN + timedelta(days=n))
        except InvalidSubscriptionError:
            return "refused"
        return "stored"

    assert sorted(race(8, add)) == ["refused"] * 7 + ["stored"]
    assert len(periods(factory)) == 1
