"""generate_monthly_invoice: priced from the plan, exact to the cent, created once."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from billing import (
    BillingService,
    CurrencyMismatchError,
    InvalidPeriodError,
    ProviderSyncError,
    invoicing,
)
from billing.errors import InvoiceStateError
from billing.invoicing import drafts_covering, find_invoice, reprice_draft, store_invoice
from billing.meters import declare_meter
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from billing.usage_lines import LineDraft

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)


def make_plan(session, key="pro", prices=()) -> Plan:
    plan = Plan(key=key, name=key.title())
    session.add(plan)
    session.flush()
    for index, fields in enumerate(prices):
        fields = {
            "key": f"{key}-{index}",
            "currency": "usd",
            "billing_scheme": "per_unit",
            **fields,
        }
        session.add(Price(plan_id=plan.id, **fields))
    session.flush()
    return plan


def subscribe(session, tenant, plan, start=JAN - timedelta(days=40), end=None) -> None:
    session.add(Subscription(tenant_id=tenant, plan_id=plan.id, effective_at=start, ended_at=end))
    session.flush()


def use(session, tenant, metric, amount, at, key=None) -> None:
    BillingService(session=session, tenant_id=tenant).record_usage(
        metric=metric, amount=amount, at=at, idempotency_key=key or f"{metric}-{amount}-{at}"
    )


def invoice(session, tenant="t1", currency="usd", **kwargs) -> Invoice:
    bs = BillingService(session=session, tenant_id=tenant, **kwargs)
    invoice_id = bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency=currency)
    return session.get(Invoice, invoice_id)


def lines_of(session, inv) -> list[tuple]:
    rows = session.execute(select(InvoiceLine).where(InvoiceLine.invoice_id == inv.id)).scalars()
    return sorted(
        (line.metric or "", line.quantity, line.amount, line.price_id is None) for line in rows
    )


def test_an_invoice_reads_every_term_of_its_prices_as_stored(session) -> None:
    """The prices read with the subscriptions (plain values, not ORM objects) have the stored
    terms, exactly: a decimal unit amount at the column's scale, tiers, package rounding and
    dimensions as JSON, in the plan's order."""
    declare_meter(session, key="tokens", group_by=["model"])
    tiers = [
        {"up_to": 10, "unit_amount_decimal": "0.5", "flat_amount": None},
        {"up_to": None, "unit_amount_decimal": "0.25", "flat_amount": 7},
    ]
    plan = make_plan(
        session,
        prices=[
            {"unit_amount": 2900, "recurring_interval": "month"},
            {
                "metric": "tokens",
                "unit_amount_decimal": Decimal("0.000123456789"),
                "transform_divide_by": 1000,
                "transform_round": "up",
                "dimensions": {"model": "gpt-4"},
            },
            {"metric": "calls", "billing_scheme": "tiered", "tiers_mode": "volume", "tiers": tiers},
        ],
    )
    subscribe(session, "t1", plan, end=FEB + timedelta(days=3))
    [(subscribed, prices)] = invoicing._subscriptions_with_prices(session, "t1", JAN, FEB)
    stored = session.scalars(
        select(Price).where(Price.plan_id == plan.id).order_by(Price.created_at, Price.key)
    ).all()
    terms = [field.name for field in dataclasses.fields(invoicing.PlanPrice)]
    assert [[getattr(price, name) for name in terms] for price in prices] == [
        [getattr(price, name) for name in terms] for price in stored
    ]
    assert prices[1].unit_amount_decimal == Decimal("0.000123456789")
    assert (prices[2].tiers, prices[1].dimensions) == (tiers, {"model": "gpt-4"})
    assert (subscribed.effective_at, subscribed.ended_at) == (
        JAN - timedelta(days=40),
        FEB + timedelta(days=3),
    )


def test_a_worked_invoice_with_fixed_per_unit_graduated_and_package_prices(session) -> None:
    plan = make_plan(
        session,
        prices=[
            {"unit_amount": 2900, "recurring_interval": "month"},
            {"metric": "tokens", "unit_amount_decimal": Decimal("0.0002")},
            {
                "metric": "calls",
                "billing_scheme": "tiered",
                "tiers_mode": "graduated",
                "tiers": [
                    {"up_to": 1000, "unit_amount_decimal": "0", "flat_amount": None},
                    {"up_to": None, "unit_amount_decimal": "0.1", "flat_amount": 50},
                ],
            },
            {
                "metric": "gb",
                "unit_amount": 500,
                "transform_divide_by": 10,
                "transform_round": "up",
            },
        ],
    )
    subscribe(session, "t1", plan)
    use(session, "t1", "tokens", 12_345_678, JAN + timedelta(days=3))
    use(session, "t1", "calls", 1500, JAN + timedelta(days=4))
    use(session, "t1", "gb", 21, JAN + timedelta(days=5))
    use(session, "t1", "tokens", 999, FEB)  # next period: not on this invoice
    use(session, "t2", "tokens", 999, JAN)  # another tenant
    inv = invoice(session)
    assert lines_of(session, inv) == [
        ("", 1, 2900, False),
        ("calls", 1500, 100, False),  # 500 × 0.1 + 50
        ("gb", 21, 1500, False),  # ⌈21/10⌉ = 3 packages × 500
        ("tokens", 12_345_678, 2469, False),  # 2469.1356 -> 2469
    ]
    assert inv.total_amount == 2900 + 100 + 1500 + 2469
    assert (inv.status, inv.currency, inv.period_start, inv.period_end) == ("open", "usd", JAN, FEB)


def test_a_subscription_that_starts_mid_month_pays_its_share(session) -> None:
    plan = make_plan(session, prices=[{"unit_amount": 3100, "recurring_interval": "month"}])
    subscribe(session, "t1", plan, start=JAN + timedelta(days=21))  # 10 of 31 days
    assert invoice(session).total_amount == 1000


def test_usage_outside_the_active_interval_is_not_billed_but_shown(session) -> None:
    plan = make_plan(session, prices=[{"metric": "tokens", "unit_amount": 1}])
    subscribe(session, "t1", plan, start=JAN + timedelta(days=10), end=JAN + timedelta(days=20))
    use(session, "t1", "tokens", 5, JAN + timedelta(days=1))
    use(session, "t1", "tokens", 7, JAN + timedelta(days=15))
    use(session, "t1", "tokens", 11, JAN + timedelta(days=25))
    assert lines_of(session, invoice(session)) == [("tokens", 7, 7, False), ("tokens", 16, 0, True)]


def test_a_plan_change_mid_month_bills_each_plan_for_its_part(session) -> None:
    basic = make_plan(
        session,
        "basic",
        [
            {"unit_amount": 3100, "recurring_interval": "month"},
            {"metric": "tokens", "unit_amount": 2},
        ],
    )
    pro = make_plan(
        session,
        "pro",
        [
            {"unit_amount": 6200, "recurring_interval": "month"},
            {"metric": "tokens", "unit_amount": 1},
        ],
    )
    switch = JAN + timedelta(days=10)
    subscribe(session, "t1", basic, end=switch)
    subscribe(session, "t1", pro, start=switch)
    use(session, "t1", "tokens", 10, JAN + timedelta(days=2))
    use(session, "t1", "tokens", 100, JAN + timedelta(days=12))
    inv = invoice(session)
    assert lines_of(session, inv) == [
        ("", 1, 1000, False),
        ("", 1, 4200, False),
        ("tokens", 10, 20, False),
        ("tokens", 100, 100, False),
    ]
    assert inv.total_amount == 5320


def test_usage_of_an_unpriced_metric_or_without_subscription_shows_at_zero(session) -> None:
    use(session, "t1", "tokens", 42, JAN)
    inv = invoice(session)
    assert lines_of(session, inv) == [("tokens", 42, 0, True)]
    assert inv.total_amount == 0


def test_prices_in_other_currencies_and_catalog_prices_are_ignored(session) -> None:
    plan = make_plan(
        session,
        prices=[
            {"unit_amount": 1000, "recurring_interval": "month"},
            {"unit_amount": 900, "recurring_interval": "month", "currency": "eur"},
        ],
    )
    session.add(Price(key="catalog", currency="usd", unit_amount=99, recurring_interval="month"))
    subscribe(session, "t1", plan)
    assert invoice(session).total_amount == 1000
    assert invoice(session, currency="EUR").total_amount == 900


def test_a_plan_without_prices_in_the_currency_raises_and_creates_nothing(session) -> None:
    plan = make_plan(session, prices=[{"unit_amount": 1000, "recurring_interval": "month"}])
    subscribe(session, "t1", plan)
    with pytest.raises(CurrencyMismatchError, match="^the tenant's plans have no price in 'gbp'$"):
        invoice(session, currency="gbp")
    assert session.execute(select(func.count()).select_from(Invoice)).scalar_one() == 0


def test_usage_of_a_metric_priced_only_in_another_currency_is_an_unpriced_line(session) -> None:
    plan = make_plan(
        session,
        prices=[
            {"metric": "tokens", "unit_amount": 2},
            {"metric": "calls", "unit_amount": 5, "currency": "eur"},
        ],
    )
    subscribe(session, "t1", plan)
    use(session, "t1", "tokens", 10, JAN + timedelta(days=2))
    use(session, "t1", "calls", 7, JAN + timedelta(days=2))
    inv = invoice(session)
    assert lines_of(session, inv) == [("calls", 7, 0, True), ("tokens", 10, 20, False)]
    assert inv.total_amount == 20


def test_a_switch_to_a_plan_in_another_currency_invoices_each_part_in_its_own(session) -> None:
    dollars = make_plan(session, "usd-plan", [{"unit_amount": 3100, "recurring_interval": "month"}])
    euros = make_plan(
        session,
        "eur-plan",
        [{"unit_amount": 6200, "recurring_interval": "month", "currency": "eur"}],
    )
    switch = JAN + timedelta(days=10)
    subscribe(session, "t1", dollars, end=switch)
    subscribe(session, "t1", euros, start=switch)
    assert invoice(session, currency="usd").total_amount == 1000  # 10 of 31 days
    assert invoice(session, currency="eur").total_amount == 4200  # 21 of 31 days


def test_called_again_it_returns_the_same_invoice_and_creates_nothing(session) -> None:
    plan = make_plan(session, prices=[{"metric": "tokens", "unit_amount": 1}])
    subscribe(session, "t1", plan)
    use(session, "t1", "tokens", 5, JAN)
    first = invoice(session)
    use(session, "t1", "tokens", 6, JAN + timedelta(days=1))
    again = invoice(session)
    assert again.id == first.id
    assert again.total_amount == 5
    assert session.execute(select(func.count()).select_from(InvoiceLine)).scalar_one() == 1


NOT_ISO = "currency must be a three-letter ISO 4217 code"
NOT_AFTER = "period_end must be after period_start"


@pytest.mark.parametrize(
    ("start", "end", "currency", "refusal"),
    [
        (datetime(2025, 1, 1), FEB, "usd", "period_start must be a timezone-aware datetime"),
        (JAN, datetime(2025, 2, 1), "usd", "period_end must be a timezone-aware datetime"),
        (FEB, JAN, "usd", NOT_AFTER),
        (JAN, JAN, "usd", NOT_AFTER),
        (JAN, FEB, "dollars", NOT_ISO),
        (JAN, FEB, "", NOT_ISO),
        (JAN, FEB, 840, NOT_ISO),
    ],
)
def test_bad_periods_and_currencies_are_refused(session, start, end, currency, refusal) -> None:
    """The refusal says what is wrong (the API answers it to the caller)."""
    bs = BillingService(session=session, tenant_id="t1")
    with pytest.raises(InvalidPeriodError) as refused:
        bs.generate_monthly_invoice(period_start=start, period_end=end, currency=currency)
    assert str(refused.value) == refusal
    assert session.execute(select(func.count()).select_from(Invoice)).scalar_one() == 0


def test_provider_sync_receives_the_invoice_and_its_id_is_stored(session) -> None:
    plan = make_plan(session, prices=[{"unit_amount": 1000, "recurring_interval": "month"}])
    subscribe(session, "t1", plan)
    seen = []

    def sync(inv, lines):
        seen.append((inv.total_amount, [line.amount for line in lines]))
        return "in_123"

    inv = invoice(session, provider_sync=sync)
    assert inv.provider_invoice_id == "in_123"
    assert seen == [(1000, [1000])]
    invoice(session, provider_sync=sync)
    assert len(seen) == 1  # an invoice that has a provider id is not sent again


def test_an_async_provider_sync_is_awaited(session) -> None:
    async def sync(inv, lines):
        return f"async-{inv.total_amount}"

    assert invoice(session, provider_sync=sync).provider_invoice_id == "async-0"


def test_a_failing_provider_sync_keeps_the_invoice_and_raises(session) -> None:
    def sync(inv, lines):
        raise ConnectionError("provider down")

    bs = BillingService(session=session, tenant_id="t1", provider_sync=sync)
    with pytest.raises(ProviderSyncError) as caught:
        bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    stored = session.get(Invoice, caught.value.invoice_id)
    assert stored is not None
    assert stored.provider_invoice_id is None


def test_unit_prices_finer_than_a_float_stay_exact(session) -> None:
    exact = Decimal("1000000.499999999999")  # 19 significant digits: a float rounds it up
    plan = make_plan(session, prices=[{"metric": "tokens", "unit_amount_decimal": exact}])
    subscribe(session, "t1", plan)
    use(session, "t1", "tokens", 1, JAN)
    session.expire_all()
    assert session.get(Price, plan.prices[0].id).unit_amount_decimal == exact
    assert invoice(session).total_amount == 1000000  # not 1000001


def test_drafts_covering_holds_a_time_in_its_period_start_inclusive_end_exclusive(
    session,
) -> None:
    draft = store_invoice(session, "t1", JAN, FEB, "usd", [])
    assert draft is not None
    jan = draft.id
    tick = timedelta(microseconds=1)
    assert drafts_covering(session, "t1", [JAN]) == [jan]
    assert drafts_covering(session, "t1", [FEB - tick]) == [jan]
    assert drafts_covering(session, "t1", [FEB]) == []
    assert drafts_covering(session, "t1", [JAN - tick, FEB]) == []


def test_re_pricing_an_invoice_that_is_not_a_draft_is_refused_naming_it(session) -> None:
    invoice = Invoice(id="inv-1", tenant_id="t1", status="finalized")
    with pytest.raises(InvoiceStateError) as refused:
        reprice_draft(session, invoice)
    assert str(refused.value) == "a finalized invoice cannot be re-priced"
    assert (refused.value.invoice_id, refused.value.status) == ("inv-1", "finalized")


def test_find_invoice_finds_the_one_of_that_period_and_currency(session) -> None:
    mar = datetime(2025, 3, 1, tzinfo=UTC)
    stored = {
        (start, end, currency): store_invoice(session, "t1", start, end, currency, [])
        for start, end, currency in [(JAN, FEB, "usd"), (FEB, mar, "usd"), (JAN, FEB, "eur")]
    }
    stored[(JAN, mar, "usd")] = None  # same start, another end: none
    for (start, end, currency), invoice in stored.items():
        assert find_invoice(session, "t1", start, end, currency) is invoice
    voided = stored[(JAN, FEB, "usd")]
    assert voided is not None
    voided.status = "void"
    session.flush()
    live = store_invoice(session, "t1", JAN, FEB, "usd", [])
    assert find_invoice(session, "t1", JAN, FEB, "usd") is live is not None


def test_a_new_invoice_s_period_is_in_utc_whatever_the_zone_of_the_host_or_the_bounds(
    session,
) -> None:
    """The object `store_invoice` returns is not read back: its period must be UTC as stored."""
    plus_two = timezone(timedelta(hours=2))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TZ", "America/New_York")
            time.tzset()
            new = store_invoice(
                session, "t1", JAN.astimezone(plus_two), FEB.astimezone(plus_two), "usd", []
            )
    finally:
        time.tzset()
    assert new is not None
    assert (new.period_start, new.period_end) == (JAN, FEB)
    assert new.period_start.utcoffset() == new.period_end.utcoffset() == timedelta(0)


def test_an_invoice_s_lines_are_created_at_the_time_of_the_write_that_made_them(
    session, monkeypatch
) -> None:
    created, repriced = datetime(2025, 2, 1, 9, tzinfo=UTC), datetime(2025, 2, 2, 9, tzinfo=UTC)
    monkeypatch.setattr(invoicing, "utcnow", lambda: created)
    new = store_invoice(session, "t1", JAN, FEB, "usd", [LineDraft(None, "tokens", 5, 0)])
    assert new is not None

    def lines_created() -> list[tuple[str | None, datetime]]:
        query = select(InvoiceLine.metric, InvoiceLine.created_at).where(
            InvoiceLine.invoice_id == new.id
        )
        return sorted(tuple(row) for row in session.execute(query))

    assert new.created_at == created
    assert lines_created() == [("tokens", created)]
    monkeypatch.setattr(invoicing, "utcnow", lambda: repriced)
    reprice_draft(session, new, [LineDraft(None, "calls", 2, 0)])
    assert lines_created() == [("calls", repriced)]
