"""Invoices of grouped usage equal a recomputation over the raw events, for every aggregation,
random groups and prices per dimension, a plan switch, and events arriving after the draft;
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from billing import BillingService, InvoicePolicy
from billing.meters import declare_meter
from billing.models import InvoiceLine, Plan, Price, Subscription
from billing.pricing import usage_amount

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
HOURS_IN_JAN = 31 * 24
MODELS = ("a", "b", "c", None)
DIMENSIONS = ({"model": "a"}, {"model": "b"}, None)  # None: the price without dimensions

Event = tuple[str | None, int, int, str | None]  # model, amount, hour, user

events = st.lists(
    st.tuples(
        st.sampled_from(MODELS),
        st.integers(0, 50),
        st.integers(-24, HOURS_IN_JAN + 24),  # whole hours: `latest` often meets a tie
        st.sampled_from(("u1", "u2", "u3", None)),
    ),
    max_size=14,
)
price_sets = st.lists(  # (dimensions index, unit amount, package size)
    st.tuples(st.integers(0, 2), st.integers(0, 9), st.sampled_from((None, 3))),
    max_size=3,
    unique_by=lambda price: price[0],
)


def aggregate(aggregation: str, chosen: Sequence[Event]) -> int:
    """The meter's quantity, computed in Python from the raw events."""
    if aggregation == "sum":
        return sum(amount for _, amount, _, _ in chosen)
    if aggregation == "count":
        return len(chosen)
    if aggregation == "max":
        return max((amount for _, amount, _, _ in chosen), default=0)
    if aggregation == "unique_count":
        return len({user for *_, user in chosen if user is not None})
    last = max(((hour, amount) for _, amount, hour, _ in chosen), default=(0, 0))
    return last[1]


def expected_lines(aggregation, plans, stretches, happened) -> list[tuple]:
    """(price key, model, quantity, amount) of each line, by the rules of billing.usage_lines."""
    lines, unpriced = [], {}
    for (first, last), plan_key in stretches:
        inside = [e for e in happened if first <= e[2] < last]
        prices = plans.get(plan_key, [])
        billed = {price.key: False for price in prices}
        for model in MODELS:
            chosen = [e for e in inside if e[0] == model]
            if not chosen:
                continue
            quantity = aggregate(aggregation, chosen)
            dimensional = [p for p in prices if p.dimensions == {"model": model}]
            billers = dimensional or [p for p in prices if p.dimensions is None]
            for price in billers:
                billed[price.key] = True
                lines.append((price.key, model, quantity, usage_amount(price, quantity)))
            if not billers:
                unpriced.setdefault(model, []).extend(chosen)
        for price in prices:
            if not billed[price.key]:
                model = (price.dimensions or {}).get("model")
                lines.append((price.key, model, 0, 0))
    for model, chosen in unpriced.items():
        quantity = aggregate(aggregation, chosen)
        if quantity:
            lines.append((None, model, quantity, 0))
    return sorted(lines, key=repr)


def make_plan(
    session, key: str, prices: list[tuple[int, int, int | None]]
) -> tuple[str, list[Price]]:
    plan = Plan(key=key, name=key)
    session.add(plan)
    session.flush()
    rows = [
        Price(
            key=f"{key}-{index}",
            plan_id=plan.id,
            currency="usd",
            metric="tokens",
            unit_amount=unit,
            transform_divide_by=package,
            dimensions=DIMENSIONS[index],
        )
        for index, unit, package in prices
    ]
    session.add_all(rows)
    session.flush()
    return plan.id, rows


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    aggregation=st.sampled_from(["sum", "count", "max", "unique_count", "latest"]),
    early=events,
    late=events,
    first_prices=price_sets,
    second_prices=price_sets,
    joined=st.integers(0, 48),
    switch=st.integers(1, HOURS_IN_JAN - 1),
)
def test_invoices_equal_a_recomputation_over_the_raw_events(
    session_factory, aggregation, early, late, first_prices, second_prices, joined, switch
) -> None:
    with session_factory() as session:
        prop = "user" if aggregation == "unique_count" else None
        declare_meter(
            session, key="tokens", aggregation=aggregation, property=prop, group_by=["model"]
        )
        one_id, one = make_plan(session, "one", first_prices)
        two_id, two = make_plan(session, "two", second_prices)
        plans = {"one": one, "two": two}
        joined = min(joined, switch - 1)
        for plan_id, start, end in ((one_id, joined, switch), (two_id, switch, None)):
            session.add(
                Subscription(
                    tenant_id="t",
                    plan_id=plan_id,
                    effective_at=JAN + timedelta(hours=start),
                    ended_at=None if end is None else JAN + timedelta(hours=end),
                )
            )
        bs = BillingService(
            session=session,
            tenant_id="t",
            now=lambda: FEB + timedelta(days=2),
            policy=InvoicePolicy(grace_period=timedelta(days=3)),
        )

        def record(batch: list[Event], prefix: str) -> None:
            for index, (model, amount, hour, user) in enumerate(batch):
                metadata = {k: v for k, v in (("model", model), ("user", user)) if v is not None}
                bs.record_usage(
                    metric="tokens",
                    amount=amount,
                    at=JAN + timedelta(hours=hour),
                    idempotency_key=f"{prefix}{index}",
                    metadata=metadata,
                )

        record(early, "early-")
        invoice_id = bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
        record(late, "late-")  # after the draft: it is re-priced
        bs.finalize_invoice(invoice_id)
        stored = session.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id))
        keys = {price.id: price.key for rows in plans.values() for price in rows}
        actual = sorted(
            [
                (
                    keys.get(line.price_id) if line.price_id else None,
                    (line.dimensions or {}).get("model"),
                    line.quantity,
                    line.amount,
                )
                for line in stored
            ],
            key=repr,
        )
        happened = [e for e in [*early, *late] if 0 <= e[2] < HOURS_IN_JAN]
        stretches = [
            ((0, joined), None),
            ((joined, switch), "one"),
            ((switch, HOURS_IN_JAN), "two"),
        ]
        assert actual == expected_lines(aggregation, plans, stretches, happened)
        session.rollback()
