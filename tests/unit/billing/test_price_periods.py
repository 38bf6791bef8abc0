"""`invoicing.price_periods`: periods priced from one read of the ledger (a finalized invoice
re-priced with the next invoice's period) each get what `price_lines` gives it alone, also when
the periods overlap or leave a gap, when a price of one groups a metric by a property the meter
does not, and when one has no price in the currency; and a monthly invoice that re-prices last
month's reads the subscriptions, meters and usage of both periods once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing import BillingService
from billing.errors import CurrencyMismatchError
from billing.invoicing import price_lines, price_periods
from billing.lifecycle import InvoicePolicy
from billing.meters import declare_meter

from .test_invoicing import make_plan, subscribe

DEC = datetime(2024, 12, 1, tzinfo=UTC)
JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)


def use(session, metric: str, amount: int, at: datetime, **metadata: str) -> None:
    BillingService(session=session, tenant_id="t1").record_usage(
        metric=metric,
        amount=amount,
        at=at,
        idempotency_key=f"{metric}-{amount}-{at.isoformat()}-{sorted(metadata.items())}",
        metadata=metadata or None,
    )


@pytest.fixture
def tenant(session) -> None:
    """Up to mid-January a plan with a price per model of `tokens` (grouping it by `model`,
    which its meter no longer does: February groups it otherwise), then one without; usage of
    every aggregation in each month, a `unique_count` user seen in both stretches of January."""
    declare_meter(session, key="peak", aggregation="max")
    declare_meter(session, key="seats", aggregation="unique_count", property="user")
    declare_meter(session, key="level", aggregation="latest")
    declare_meter(session, key="tokens", group_by=["model"])
    old = make_plan(
        session,
        "old",
        prices=[
            {"unit_amount": 1000, "recurring_interval": "month"},
            {"metric": "tokens", "unit_amount": 3, "dimensions": {"model": "gpt"}},
            {"metric": "tokens", "unit_amount": 1},
            {"metric": "peak", "unit_amount": 7},
        ],
    )
    new = make_plan(
        session,
        "new",
        prices=[
            {"unit_amount": 2000, "recurring_interval": "month"},
            {"metric": "tokens", "unit_amount": 2},
            {"metric": "seats", "unit_amount": 50},
        ],
    )
    switch = JAN + timedelta(days=15)
    subscribe(session, "t1", old, start=DEC - timedelta(days=40), end=switch)
    subscribe(session, "t1", new, start=switch)
    declare_meter(session, key="tokens")  # grouped by model only where the old plan bills
    for month in (DEC, JAN, FEB):
        for day in (2, 20):
            at = month + timedelta(days=day)
            use(session, "tokens", 100 + day, at, model="gpt")
            use(session, "tokens", 10 + day, at, model="llama")
            use(session, "peak", day, at)
            use(session, "level", day, at)
            use(session, "seats", 1, at, user="ann")
            use(session, "calls", day, at)


PERIODS = {  # December and January group `tokens` by model, February does not
    "adjacent": [(DEC, JAN), (JAN, FEB)],
    "a gap": [(DEC, DEC + timedelta(days=10)), (JAN, FEB)],
    "later first": [(JAN, FEB), (DEC, JAN)],
    "overlapping": [(DEC, FEB), (JAN, FEB)],
    "grouped otherwise": [(DEC, JAN), (FEB, MAR)],
    "three": [(DEC, JAN), (JAN, FEB), (FEB, MAR)],
}


@pytest.mark.parametrize("periods", PERIODS.values(), ids=PERIODS.keys())
def test_each_period_is_priced_as_it_is_alone(session, tenant, periods) -> None:
    alone = [price_lines(session, "t1", start, end, "usd") for start, end in periods]
    together = [lines() for lines in price_periods(session, "t1", periods, "usd")]
    assert together == alone
    assert all(alone)


@pytest.mark.parametrize("refused_first", [False, True])
def test_a_period_without_prices_in_the_currency_is_refused_alone(
    session, tenant, refused_first
) -> None:
    eur = make_plan(session, "eur", prices=[{"unit_amount": 900, "currency": "eur"}])
    subscribe(session, "t2", eur, start=FEB)
    subscribe(session, "t2", make_plan(session, "usd", prices=[{"unit_amount": 5}]), end=FEB)
    periods = [(JAN, FEB), (FEB, MAR)]
    priced = price_periods(session, "t2", periods[::-1] if refused_first else periods, "usd")
    january, february = priced[::-1] if refused_first else priced
    with pytest.raises(CurrencyMismatchError, match="no price in 'usd'"):
        february()
    assert january() == price_lines(session, "t2", JAN, FEB, "usd")
    assert january()  # the periods after a refused one are priced too


def test_a_monthly_invoice_reads_both_periods_at_once_when_it_re_prices_the_last(
    session, tenant, statements
) -> None:
    policy = InvoicePolicy(late_usage_lookback=timedelta(days=3650))
    service = BillingService(session=session, tenant_id="t1", policy=policy)
    service.generate_monthly_invoice(period_start=DEC, period_end=JAN, currency="usd")
    statements.clear()
    service.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    assert statements.count("SELECT subscriptions.id, subscriptions.effective_at,") == 1
    assert sum(s.endswith("meters.aggregation,") for s in statements) == 1  # the meters
    assert sum(s.startswith("SELECT usage_events.metric,") for s in statements) == 1  # GROUP BY
    assert statements.count("SELECT anon_1.k0, anon_1.k1,") == 1  # the `latest` meter's
