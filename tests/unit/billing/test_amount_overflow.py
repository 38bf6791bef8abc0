"""Amounts over 2**63-1 are found while pricing (AmountOverflowError names the line)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from billing import AmountOverflowError, BillingError, BillingService, InvoicePolicy
from billing.errors import PERMANENT_ERRORS
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)
MAX = 2**63 - 1


def plan_with(session, *prices: dict) -> None:
    plan = Plan(key="big", name="Big")
    session.add(plan)
    session.flush()
    for index, fields in enumerate(prices):
        session.add(Price(plan_id=plan.id, key=f"big-{index}", currency="usd", **fields))
    session.add(Subscription(tenant_id="t1", plan_id=plan.id, effective_at=JAN - timedelta(days=9)))
    session.flush()


def use(session, amount: int) -> None:
    BillingService(session=session, tenant_id="t1").record_usage(
        metric="tokens", amount=amount, at=JAN + timedelta(days=3), idempotency_key="k"
    )


def generate(session) -> Invoice:
    bs = BillingService(session=session, tenant_id="t1")
    invoice_id = bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    return session.get(Invoice, invoice_id)


def stored(session) -> tuple[int, int]:
    invoices = session.execute(select(func.count()).select_from(Invoice)).scalar_one()
    lines = session.execute(select(func.count()).select_from(InvoiceLine)).scalar_one()
    return invoices, lines


def test_a_line_of_exactly_2_63_minus_1_is_billed(session) -> None:
    plan_with(session, {"metric": "tokens", "unit_amount": 1})
    use(session, MAX)
    assert generate(session).total_amount == MAX


def test_2_62_units_at_2_cents_raise_amount_overflow_naming_the_line(session) -> None:
    plan_with(session, {"metric": "tokens", "unit_amount": 2})
    use(session, 2**62)
    with pytest.raises(AmountOverflowError) as caught:
        generate(session)
    assert (caught.value.metric, caught.value.price_key) == ("tokens", "big-0")
    assert str(caught.value) == (
        f"the line of metric 'tokens' at price 'big-0' (2 per unit) comes to {2**62} units and "
        f"{2**63} minor units, over the 2**63-1 the ledger stores"
    )
    assert stored(session) == (0, 0)


@pytest.mark.parametrize(
    ("price", "described"),
    [
        ({"unit_amount_decimal": Decimal("2.50")}, "'big-0' (2.5 per unit)"),
        ({"unit_amount_decimal": Decimal("100")}, "'big-0' (100 per unit)"),
        (
            {
                "billing_scheme": "tiered",
                "tiers_mode": "volume",
                "tiers": [{"up_to": None, "unit_amount_decimal": "3"}],
            },
            "'big-0' (tiered)",
        ),
    ],
)
def test_the_overflow_names_the_price_s_rate(session, price, described) -> None:
    plan_with(session, {"metric": "tokens", **price})
    use(session, 2**62)
    with pytest.raises(AmountOverflowError) as caught:
        generate(session)
    assert f"metric 'tokens' at price {described} comes to" in str(caught.value)


@pytest.mark.parametrize(
    ("metric", "price_key", "described"),
    [("tokens", None, "none"), ("calls", "big-0", "'big-0' (1 per unit)")],
)
def test_usage_over_2_63_minus_1_units_is_named_with_its_exact_quantity(
    session, metric, price_key, described
) -> None:
    """On SQLite too, where the events' sum is over what an integer holds (SQL's sum() of
    them would fail with a bare `integer overflow`)."""
    plan_with(session, {"metric": "calls", "unit_amount": 1})
    bs = BillingService(session=session, tenant_id="t1")
    for at in (JAN, FEB):  # the most a month's counter holds, in each of two months
        bs.record_usage(metric=metric, amount=MAX, at=at, idempotency_key=at.isoformat())
    with pytest.raises(AmountOverflowError) as caught:
        bs.generate_monthly_invoice(
            period_start=JAN, period_end=FEB + timedelta(days=28), currency="usd"
        )
    assert (caught.value.metric, caught.value.price_key) == (metric, price_key)
    assert f"metric {metric!r} at price {described} comes to {2 * MAX} units" in str(caught.value)


@pytest.mark.parametrize(
    ("price", "overflows"),
    [(Decimal("0.999999999999"), False), (Decimal("1.000000000001"), True)],
)
def test_decimal_prices_on_either_side_of_the_limit(session, price, overflows) -> None:
    plan_with(session, {"metric": "tokens", "unit_amount_decimal": price})
    use(session, MAX)
    if overflows:
        with pytest.raises(AmountOverflowError):
            generate(session)
        assert stored(session) == (0, 0)
    else:
        assert generate(session).total_amount < MAX


def test_lines_that_fit_but_add_up_to_more_than_2_63_minus_1_are_refused(session) -> None:
    plan_with(
        session,
        {"unit_amount": 2**62, "recurring_interval": "month"},
        {"metric": "tokens", "unit_amount": 1},
    )
    use(session, 2**62)  # the fee plus this is 2**63: one more than fits
    with pytest.raises(AmountOverflowError) as caught:
        generate(session)
    assert (caught.value.metric, caught.value.price_key) == (None, None)
    assert str(caught.value) == (
        f"the invoice's 2 lines add up to {2**63} minor units, over the 2**63-1 the ledger stores"
    )
    assert stored(session) == (0, 0)


def test_lines_that_add_up_to_exactly_2_63_minus_1_are_billed(session) -> None:
    plan_with(
        session,
        {"unit_amount": 2**62, "recurring_interval": "month"},
        {"metric": "tokens", "unit_amount": 1},
    )
    use(session, 2**62 - 1)
    assert generate(session).total_amount == MAX


def in_march(session, **policy) -> BillingService:
    """The tenant's service on March 2nd, January within the late-usage lookback."""
    now = MAR + timedelta(days=1)
    return BillingService(
        session=session, tenant_id="t1", now=lambda: now, policy=InvoicePolicy(**policy)
    )


def use_on(session, amount: int, day: datetime) -> None:
    in_march(session).record_usage(
        metric="tokens", amount=amount, at=day, idempotency_key=day.isoformat()
    )


def february(service: BillingService) -> str:
    return service.generate_monthly_invoice(period_start=FEB, period_end=MAR, currency="usd")


def test_an_adjustment_line_taking_the_total_over_2_63_minus_1_is_refused(session) -> None:
    plan_with(session, {"metric": "tokens", "unit_amount": 1})
    use(session, 2**62)
    generate(session)
    use_on(session, 2**62 - 1, JAN + timedelta(days=4))  # late: an adjustment line of February
    use_on(session, 2**62 + 1, FEB + timedelta(days=4))
    with pytest.raises(AmountOverflowError) as caught:
        february(in_march(session))
    assert (caught.value.metric, caught.value.price_key) == (None, None)
    assert str(caught.value) == (
        f"the invoice's 2 lines add up to {2**63} minor units, over the 2**63-1 the ledger stores"
    )
    assert stored(session) == (1, 1)


def test_a_draft_re_priced_with_an_adjustment_over_2_63_minus_1_is_left_as_it_was(
    session,
) -> None:
    plan_with(session, {"metric": "tokens", "unit_amount": 1})
    use(session, 2**62)
    generate(session)
    use_on(session, 2**62 + 1, FEB + timedelta(days=4))
    grace = in_march(session, grace_period=timedelta(days=3))
    draft_id = february(grace)
    use_on(session, 2**62 - 1, JAN + timedelta(days=4))  # late: an adjustment line of February
    with pytest.raises(AmountOverflowError) as caught:
        february(grace)  # re-prices the draft
    assert (caught.value.metric, caught.value.price_key) == (None, None)
    draft = session.get(Invoice, draft_id)
    assert (draft.status, draft.total_amount) == ("draft", 2**62 + 1)
    assert stored(session) == (2, 2)


def test_amount_overflow_is_a_permanent_billing_error() -> None:
    assert issubclass(AmountOverflowError, BillingError)
    assert AmountOverflowError in PERMANENT_ERRORS
