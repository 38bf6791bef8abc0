"""A tenant with a zone: its days, invoice months, fixed-fee proration and payloads are local."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from billing import BillingService, InvalidPeriodError
from billing.models import Invoice, Plan, Price, Subscription, UsageAggregate
from billing.tenants import set_tenant
from webhooks.models import WebhookEvent

SECOND = timedelta(seconds=1)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def use(session, tenant: str, amount: int, moment: datetime) -> None:
    BillingService(session=session, tenant_id=tenant).record_usage(
        metric="tokens", amount=amount, at=moment, idempotency_key=f"{amount}-{moment}"
    )


def aggregate(session, tenant: str, day_start: datetime) -> int:
    return BillingService(session=session, tenant_id=tenant).aggregate_daily(
        metric="tokens", day_start=day_start
    )


def payloads(session, topic: str) -> list[dict]:
    rows = session.scalars(select(WebhookEvent).where(WebhookEvent.topic == topic))
    return [row.payload for row in rows]


@pytest.mark.parametrize(
    ("day", "start", "end"),
    [
        (at(2025, 3, 9, 12), at(2025, 3, 9, 5), at(2025, 3, 10, 4)),  # 23 hours
        (at(2025, 11, 2, 12), at(2025, 11, 2, 4), at(2025, 11, 3, 5)),  # 25 hours
    ],
)
def test_a_new_york_day_across_a_change_aggregates_exactly_its_events(
    session, day, start, end
) -> None:
    set_tenant(session, "ny", timezone="America/New_York")
    use(session, "ny", 1, start - SECOND)  # the day before
    use(session, "ny", 10, start)
    use(session, "ny", 100, start + (end - start) / 2)
    use(session, "ny", 1000, end - SECOND)
    use(session, "ny", 5, end)  # the day after
    use(session, "utc", 7, start)  # a UTC tenant's event: another day, another tenant
    assert aggregate(session, "ny", day) == 1110
    [row] = session.scalars(select(UsageAggregate).where(UsageAggregate.tenant_id == "ny"))
    assert (row.period_start, row.total) == (start, 1110)


def test_any_instant_of_the_local_day_names_it(session) -> None:
    set_tenant(session, "ktm", timezone="Asia/Kathmandu")
    use(session, "ktm", 3, at(2025, 3, 8, 18, 15))
    assert aggregate(session, "ktm", at(2025, 3, 9, 18, 14)) == 3
    assert aggregate(session, "ktm", datetime.fromisoformat("2025-03-09T00:00:00+05:45")) == 3
    starts = session.scalars(select(UsageAggregate.period_start)).all()
    assert starts == [at(2025, 3, 8, 18, 15)]


def test_a_tenant_without_a_row_keeps_utc_days(session) -> None:
    use(session, "t", 2, at(2025, 3, 9, 23, 59))
    use(session, "t", 4, at(2025, 3, 10))
    assert aggregate(session, "t", at(2025, 3, 9, 12)) == 2


# --- invoices ---------------------------------------------------------------------------------


@pytest.fixture
def fee_plan(session) -> Plan:
    plan = Plan(key="base", name="Base")
    session.add(plan)
    session.flush()
    session.add(
        Price(
            plan_id=plan.id,
            key="base-fee",
            currency="usd",
            billing_scheme="per_unit",
            unit_amount=3000,
        )
    )
    session.flush()
    return plan


def invoice(session, tenant: str, start: datetime, end: datetime) -> Invoice:
    service = BillingService(session=session, tenant_id=tenant, now=lambda: at(2026, 1, 1))
    invoice_id = service.generate_monthly_invoice(
        period_start=start, period_end=end, currency="usd"
    )
    return session.get(Invoice, invoice_id)


def test_a_monthly_fee_prorates_by_the_seconds_of_the_local_month(session, fee_plan) -> None:
    set_tenant(session, "ny", timezone="America/New_York")
    # From local midnight on March 16 (EDT) to the end of March: 16 of the month's 30d 23h.
    session.add(Subscription(tenant_id="ny", plan_id=fee_plan.id, effective_at=at(2025, 3, 16, 4)))
    session.flush()
    bill = invoice(session, "ny", at(2025, 3, 1, 5), at(2025, 4, 1, 4))
    active, month = 16 * 86400, 31 * 86400 - 3600
    assert bill.total_amount == 1550 == (3000 * active * 2 + month) // (2 * month)
    # A 31-day month would have given 1548.


def test_a_full_local_month_bills_the_whole_fee(session, fee_plan) -> None:
    set_tenant(session, "ktm", timezone="Asia/Kathmandu")
    session.add(Subscription(tenant_id="ktm", plan_id=fee_plan.id, effective_at=at(2024, 1, 1)))
    session.flush()
    assert invoice(
        session, "ktm", at(2025, 2, 28, 18, 15), at(2025, 3, 31, 18, 15)
    ).total_amount == (3000)


@pytest.mark.parametrize(
    ("start", "end", "named"),
    [
        (at(2025, 3, 1), at(2025, 4, 1), "period_start"),  # UTC midnights
        (at(2025, 3, 1, 5), at(2025, 4, 1, 5), "period_end"),  # 01:00 EDT
    ],
)
def test_a_period_not_bounded_by_local_midnights_is_refused(session, start, end, named) -> None:
    set_tenant(session, "ny", timezone="America/New_York")
    with pytest.raises(InvalidPeriodError, match=f"{named} .* not a midnight in America/New_York"):
        invoice(session, "ny", start, end)
    assert session.scalar(select(func.count()).select_from(Invoice)) == 0


def test_a_utc_tenant_may_still_be_invoiced_for_any_instants(session) -> None:
    set_tenant(session, "u", timezone="UTC")
    assert invoice(session, "u", at(2025, 3, 1, 7), at(2025, 3, 2, 9)).status == "open"


def test_invoice_events_show_the_period_with_the_tenants_offset(session) -> None:
    set_tenant(session, "ny", timezone="America/New_York")
    invoice(session, "ny", at(2025, 3, 1, 5), at(2025, 4, 1, 4))
    invoice(session, "plain", at(2025, 3, 1), at(2025, 4, 1))
    created = {p["tenant_id"]: p for p in payloads(session, "billing.invoice.created")}
    finalized = {p["tenant_id"]: p for p in payloads(session, "billing.invoice.finalized")}
    for event in (created["ny"], finalized["ny"]):
        assert (event["period_start"], event["period_end"]) == (
            "2025-03-01T00:00:00-05:00",
            "2025-04-01T00:00:00-04:00",
        )
    for event in (created["plain"], finalized["plain"]):
        assert (event["period_start"], event["period_end"]) == (
            "2025-03-01T00:00:00+00:00",
            "2025-04-01T00:00:00+00:00",
        )


def test_a_later_change_of_state_shows_the_period_with_the_tenants_offset(session) -> None:
    set_tenant(session, "ny", timezone="America/New_York")
    bill = invoice(session, "ny", at(2025, 3, 1, 5), at(2025, 4, 1, 4))
    BillingService(session=session, tenant_id="ny").pay_invoice(bill.id)  # zone read again
    [paid] = payloads(session, "billing.invoice.paid")
    assert (paid["period_start"], paid["period_end"]) == (
        "2025-03-01T00:00:00-05:00",
        "2025-04-01T00:00:00-04:00",
    )


def test_the_upcoming_preview_is_the_local_month_so_far(session, fee_plan) -> None:
    set_tenant(session, "ny", timezone="America/New_York")
    service = BillingService(session=session, tenant_id="ny", now=lambda: at(2025, 4, 1, 3))
    preview = service.preview_upcoming_invoice(currency="usd")
    assert (preview.period_start, preview.period_end) == (at(2025, 3, 1, 5), at(2025, 4, 1, 4))
