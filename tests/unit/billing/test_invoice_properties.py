"""Invoice invariants over random usage and prices, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from billing import BillingService
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from billing.pricing import usage_amount

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
SECONDS_IN_JAN = 31 * 86400

events = st.lists(
    st.tuples(
        st.sampled_from(["tokens", "calls", "gb"]),
        st.integers(0, 10**6),
        st.integers(-86400, SECONDS_IN_JAN + 86400),
    ),
    max_size=12,
)
unit_prices = st.decimals(min_value=0, max_value=50, places=4)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=events,
    unit=unit_prices,
    fee=st.integers(0, 10**6),
    start=st.integers(-86400, SECONDS_IN_JAN - 1),
)
def test_invoice_total_is_the_sum_of_lines_and_all_usage_is_shown(
    session_factory, events, unit, fee, start
) -> None:
    with session_factory() as session:
        plan = Plan(key="p", name="P")
        session.add(plan)
        session.flush()
        session.add_all(
            [
                Price(
                    key="fee",
                    plan_id=plan.id,
                    currency="usd",
                    unit_amount=fee,
                    recurring_interval="month",
                ),
                Price(
                    key="tok",
                    plan_id=plan.id,
                    currency="usd",
                    metric="tokens",
                    unit_amount_decimal=Decimal(unit),
                ),
            ]
        )
        effective = JAN + timedelta(seconds=start)
        session.add(Subscription(tenant_id="t", plan_id=plan.id, effective_at=effective))
        bs = BillingService(session=session, tenant_id="t")
        for index, (metric, amount, offset) in enumerate(events):
            bs.record_usage(
                metric=metric,
                amount=amount,
                at=JAN + timedelta(seconds=offset),
                idempotency_key=str(index),
            )
        invoice_id = bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
        invoice = session.get(Invoice, invoice_id)
        lines = (
            session.execute(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id))
            .scalars()
            .all()
        )
        assert invoice.total_amount == sum(line.amount for line in lines)
        in_period = [(m, a, o) for m, a, o in events if 0 <= o < SECONDS_IN_JAN]
        for metric in ("tokens", "calls", "gb"):
            used = sum(a for m, a, _ in in_period if m == metric)
            shown = sum(line.quantity for line in lines if line.metric == metric)
            assert shown == used
        billed = sum(a for m, a, o in in_period if m == "tokens" and o >= max(start, 0))
        (token_line,) = [line for line in lines if line.price_id is not None and line.metric]
        assert token_line.quantity == billed
        assert token_line.amount == usage_amount(session.get(Price, token_line.price_id), billed)
        assert all(line.amount == 0 for line in lines if line.price_id is None)
        session.rollback()
