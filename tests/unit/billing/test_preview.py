"""Invoice previews: what an invoice would bill now, priced as generation prices it, storing
nothing, for the caller's tenant only. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from billing import BillingService, CurrencyMismatchError, InvalidPeriodError, InvoicePolicy
from billing.models import Base, Invoice
from tests.unit.billing.test_lifecycle import FEB, JAN, MAR, lines_of, seed_plan
from webhooks.models import Base as WebhooksBase

MID_JAN = datetime(2025, 1, 15, 12, tzinfo=UTC)
TICK = timedelta(microseconds=1)


@pytest.fixture
def plan(session):
    return seed_plan(session, tenants=("t1", "t2"))


def service(session, tenant="t1", now=MID_JAN, **policy) -> BillingService:
    return BillingService(
        session=session, tenant_id=tenant, now=lambda: now, policy=InvoicePolicy(**policy)
    )


def use(session, tenant, amount, at, key) -> None:
    service(session, tenant, now=at).record_usage(
        metric="tokens", amount=amount, at=at, idempotency_key=key
    )


def row_counts(session) -> dict[str, int]:
    tables = [*Base.metadata.sorted_tables, *WebhooksBase.metadata.sorted_tables]
    return {
        t.name: session.execute(select(func.count()).select_from(t)).scalar_one() for t in tables
    }


def preview_lines(preview) -> list[tuple]:
    return sorted((line.metric or "", line.quantity, line.amount) for line in preview.lines)


def test_a_preview_equals_the_invoice_generated_right_after(session, plan) -> None:
    use(session, "t1", 300, JAN, "a")
    use(session, "t1", 50, MID_JAN, "b")
    preview = service(session).preview_invoice(period_start=JAN, period_end=FEB, currency="USD")
    assert preview_lines(preview) == [("", 1, 1000), ("tokens", 350, 700)]
    assert (preview.total_amount, preview.currency, preview.tenant_id) == (1700, "usd", "t1")
    invoice_id = service(session, now=FEB).generate_monthly_invoice(
        period_start=JAN, period_end=FEB, currency="usd"
    )
    invoice = session.get(Invoice, invoice_id)
    assert lines_of(session, invoice) == preview_lines(preview)
    assert invoice.total_amount == preview.total_amount


def test_a_preview_equals_a_draft_re_priced_with_later_usage(session, plan) -> None:
    use(session, "t1", 10, JAN, "a")
    draft_id = service(session, now=FEB, grace_period=timedelta(days=3)).generate_monthly_invoice(
        period_start=JAN, period_end=FEB, currency="usd"
    )
    use(session, "t1", 90, MID_JAN, "b")
    preview = service(session, now=FEB).preview_invoice(
        period_start=JAN, period_end=FEB, currency="usd"
    )
    finalized = service(session, now=FEB).finalize_invoice(draft_id)
    assert (
        lines_of(session, finalized)
        == preview_lines(preview)
        == [
            ("", 1, 1000),
            ("tokens", 100, 200),
        ]
    )
    assert finalized.total_amount == preview.total_amount == 1200


def test_a_preview_stores_nothing_takes_no_number_and_publishes_nothing(session, plan) -> None:
    use(session, "t1", 5, JAN, "a")
    service(session, now=MAR).generate_monthly_invoice(
        period_start=JAN, period_end=FEB, currency="usd"
    )
    before = row_counts(session)
    for start, end in [(JAN, FEB), (FEB, MAR)]:
        service(session).preview_invoice(period_start=start, period_end=end, currency="usd")
    service(session).preview_upcoming_invoice(currency="usd")
    assert row_counts(session) == before
    assert before["invoices"] == 1
    assert before["webhook_events"] == 2


def test_a_preview_holds_only_the_tenants_own_usage_inside_the_period(session, plan) -> None:
    use(session, "t1", 1, JAN, "at-start")
    use(session, "t1", 2, FEB - TICK, "last-instant")
    use(session, "t1", 4, FEB, "at-end")  # the next period's
    use(session, "t2", 1000, MID_JAN, "other-tenant")
    preview = service(session, now=FEB).preview_invoice(
        period_start=JAN, period_end=FEB, currency="usd"
    )
    assert preview_lines(preview) == [("", 1, 1000), ("tokens", 3, 6)]


def test_the_upcoming_invoice_is_the_month_containing_now_so_far(session, plan) -> None:
    use(session, "t1", 7, JAN, "january")
    use(session, "t1", 9, FEB, "february")
    for now, period, tokens in [
        (MID_JAN, (JAN, FEB), 7),
        (FEB - TICK, (JAN, FEB), 7),
        (FEB, (FEB, MAR), 9),
    ]:
        upcoming = service(session, now=now).preview_upcoming_invoice(currency="usd")
        assert (upcoming.period_start, upcoming.period_end) == period
        assert preview_lines(upcoming) == [("", 1, 1000), ("tokens", tokens, 2 * tokens)]


def test_a_tenant_without_a_plan_previews_its_usage_at_zero(session, plan) -> None:
    use(session, "nobody", 3, JAN, "a")
    upcoming = service(session, "nobody").preview_upcoming_invoice(currency="eur")
    assert (preview_lines(upcoming), upcoming.total_amount) == ([("tokens", 3, 0)], 0)


@pytest.mark.parametrize(
    ("start", "end", "currency", "message"),
    [
        (JAN, JAN, "usd", "after period_start"),
        (JAN.replace(tzinfo=None), FEB, "usd", "timezone-aware"),
        (JAN, FEB, "dollars", "three-letter"),
        (JAN, FEB, 840, "three-letter"),
    ],
)
def test_a_malformed_period_or_currency_is_refused(session, plan, start, end, currency, message):
    with pytest.raises(InvalidPeriodError, match=message):
        service(session).preview_invoice(period_start=start, period_end=end, currency=currency)


def test_a_currency_the_plan_has_no_price_in_is_refused(session, plan) -> None:
    with pytest.raises(CurrencyMismatchError):
        service(session).preview_upcoming_invoice(currency="eur")
