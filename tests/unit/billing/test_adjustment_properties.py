"""Late usage invariant over random tiers and late batches, on SQLite and PostgreSQL: once the
invoices after January exist, what January's own lines and the adjustments billed for it, less
the late-usage credit notes (on January or on the invoices carrying its adjustments), add up to
is the price of all of January's usage now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from billing import BillingService, InvoicePolicy
from billing.adjustments import LATE_USAGE_REASON
from billing.models import CreditNote, Invoice, InvoiceLine, Plan, Price, Subscription
from billing.pricing import usage_amount

MONTHS = [datetime(2025, month, 1, tzinfo=UTC) for month in range(1, 7)]
POLICY = InvoicePolicy(late_usage_lookback=timedelta(days=200))
amounts = st.lists(st.integers(0, 300), min_size=1, max_size=3)


def tiered(session, mode: str, up_to: int, first: int, second: int) -> Price:
    plan = Plan(key="p", name="P")
    session.add(plan)
    session.flush()
    price = Price(
        key="tok",
        plan_id=plan.id,
        currency="usd",
        metric="tokens",
        billing_scheme="tiered",
        tiers_mode=mode,
        tiers=[
            {"up_to": up_to, "unit_amount_decimal": str(first)},
            {"up_to": None, "unit_amount_decimal": str(second)},
        ],
    )
    session.add_all([price, Subscription(tenant_id="t", plan_id=plan.id, effective_at=MONTHS[0])])
    session.flush()
    return price


def billed_for_january(session, january: Invoice) -> int:
    adjusted = session.scalar(
        select(func.coalesce(func.sum(InvoiceLine.amount), 0)).where(
            InvoiceLine.adjusts_invoice_id == january.id
        )
    )
    credited = session.scalar(
        select(func.coalesce(func.sum(CreditNote.amount), 0)).where(
            CreditNote.reason == LATE_USAGE_REASON
        )
    )
    return january.total_amount + int(adjusted) - int(credited)


@example(mode="volume", up_to=100, prices=(2, 1), on_time=[10], late=[[89], [2]])
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mode=st.sampled_from(["graduated", "volume"]),
    up_to=st.integers(1, 200),
    prices=st.tuples(st.integers(0, 20), st.integers(0, 20)),
    on_time=amounts,
    late=st.lists(amounts, min_size=1, max_size=3),
)
def test_january_bills_the_price_of_all_its_usage_once_the_next_invoices_exist(
    session_factory, mode, up_to, prices, on_time, late
) -> None:
    with session_factory() as session:
        price = tiered(session, mode, up_to, *prices)
        clock = MONTHS[-1]
        bs = BillingService(session=session, tenant_id="t", now=lambda: clock, policy=POLICY)

        def send(amounts: list[int], batch: int) -> None:
            for index, amount in enumerate(amounts):
                bs.record_usage(
                    metric="tokens",
                    amount=amount,
                    at=MONTHS[0] + timedelta(days=index + 1),
                    idempotency_key=f"{batch}-{index}",
                )

        send(on_time, 0)
        january_id = bs.generate_monthly_invoice(
            period_start=MONTHS[0], period_end=MONTHS[1], currency="usd"
        )
        for batch, amounts_late in enumerate(late, start=1):
            send(amounts_late, batch)
            for _ in range(2):  # a retry changes nothing
                bs.generate_monthly_invoice(
                    period_start=MONTHS[batch], period_end=MONTHS[batch + 1], currency="usd"
                )
            total = sum(on_time) + sum(sum(a) for a in late[:batch])
            january = session.get(Invoice, january_id)
            assert billed_for_january(session, january) == usage_amount(price, total)
