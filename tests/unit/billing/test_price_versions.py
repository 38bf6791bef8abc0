"""A price a finalized invoice bills keeps its terms: `billing catalog apply` makes a new
version of it, the invoice's period is neither billed again nor credited at the new terms, and
its late usage is still priced at the terms it was billed with. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from billing import BillingService
from billing.adjustments import Adjustment
from billing.catalog import _retire, apply_changes, load_catalog, plan_changes
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from tests.unit.billing.test_lifecycle import FEB, JAN, MAR

DAY = timedelta(days=1)
CATALOG = """
plans:
  - key: pro
    name: Pro
    prices:
      - {key: pro-tokens, currency: usd, metric: tokens, unit_amount: 2}
"""
AT_3 = CATALOG.replace("unit_amount: 2", "unit_amount: 3")
SETTLE = {"paid": BillingService.pay_invoice, "uncollectible": BillingService.mark_uncollectible}


def service(session, now) -> BillingService:
    return BillingService(session=session, tenant_id="t", now=lambda: now)


def apply(session, text: str) -> list[str]:
    changes = plan_changes(session, load_catalog(text, "catalog.yaml"), now=FEB + 10 * DAY)
    apply_changes(session, [change for change in changes if change.action != "absent"])
    return [change.describe() for change in changes]


def january(session, status: str, ended_at=None) -> Invoice:
    """1,000 tokens at 2 in January, invoiced (2,000) and settled as `status`."""
    apply(session, CATALOG)
    plan = session.scalars(select(Plan)).one()
    session.add(Subscription(tenant_id="t", plan_id=plan.id, effective_at=JAN, ended_at=ended_at))
    billing = service(session, FEB + DAY)
    billing.record_usage(metric="tokens", amount=1000, at=JAN + 5 * DAY, idempotency_key="jan")
    invoice_id = billing.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    if status != "open":
        SETTLE[status](billing, invoice_id)
    return session.get(Invoice, invoice_id)


def usage_lines(session, invoice: Invoice) -> list[tuple]:
    rows = session.execute(
        select(InvoiceLine.kind, Price.key, Price.unit_amount, InvoiceLine.quantity)
        .add_columns(InvoiceLine.amount)
        .join(Price, Price.id == InvoiceLine.price_id)
        .where(InvoiceLine.invoice_id == invoice.id)
    )
    return sorted(tuple(row) for row in rows)


@pytest.mark.parametrize("status", ["paid", "uncollectible"])
def test_a_price_a_settled_invoice_bills_gets_a_new_version_and_its_period_is_not_re_billed(
    session, status
) -> None:
    invoice = january(session, status, ended_at=FEB)  # no live subscription holds the price
    [change] = apply(session, AT_3)
    assert change == (
        "~ price pro-tokens: unit_amount 2 → 3; a new version (a"
        f"{'n' if status == 'uncollectible' else ''} {status} invoice bills it; the old one is "
        "kept as pro-tokens@v1)"
    )
    assert usage_lines(session, invoice) == [("charge", "pro-tokens@v1", 2, 1000, 2000)]
    assert service(session, MAR + DAY).pending_adjustments(currency="usd") == []
    assert (invoice.status, invoice.total_amount) == (status, 2000)


def test_late_usage_after_a_price_change_is_priced_at_the_invoice_s_terms(session) -> None:
    invoice = january(session, "paid")
    apply(session, AT_3)
    billing = service(session, MAR + DAY)
    billing.record_usage(metric="tokens", amount=10, at=JAN + 20 * DAY, idempotency_key="late")
    [line] = session.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id))
    assert billing.pending_adjustments(currency="usd") == [
        Adjustment(invoice.id, line.id, line.price_id, "tokens", 10, 20)
    ]
    february = session.get(
        Invoice, billing.generate_monthly_invoice(period_start=FEB, period_end=MAR, currency="usd")
    )
    assert usage_lines(session, february) == [
        ("adjustment", "pro-tokens@v1", 2, 10, 20),
        ("charge", "pro-tokens", 3, 0, 0),
    ]


def test_late_usage_of_the_plan_s_other_prices_is_priced_beside_the_old_version(session) -> None:
    """Only the changed price is priced with its old version; the plan's others as they are."""
    calls = "\n      - {key: pro-calls, currency: usd, metric: calls, unit_amount: 5}\n"
    apply(session, CATALOG.rstrip("\n") + calls)
    plan = session.scalars(select(Plan)).one()
    session.add(Subscription(tenant_id="t", plan_id=plan.id, effective_at=JAN))
    billing = service(session, FEB + DAY)
    for metric, amount in (("tokens", 1000), ("calls", 4)):
        billing.record_usage(metric=metric, amount=amount, at=JAN + DAY, idempotency_key=metric)
    invoice_id = billing.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    billing.pay_invoice(invoice_id)
    apply(session, AT_3.rstrip("\n") + calls)  # tokens 2 → 3: a new version
    for metric in ("tokens", "calls"):
        billing.record_usage(
            metric=metric, amount=10, at=JAN + 20 * DAY, idempotency_key=metric + "+"
        )
    late = service(session, MAR + DAY).pending_adjustments(currency="usd")
    assert sorted((a.metric, a.quantity, a.amount) for a in late) == [
        ("calls", 10, 50),
        ("tokens", 10, 20),
    ]


def test_a_price_only_a_void_invoice_billed_is_changed_in_place(session) -> None:
    invoice = january(session, "open", ended_at=FEB)
    service(session, FEB + DAY).void_invoice(invoice.id)
    price_id = session.scalars(select(Price.id)).one()
    assert apply(session, AT_3) == ["~ price pro-tokens: unit_amount 2 → 3"]
    assert session.execute(select(Price.id, Price.key, Price.unit_amount)).all() == [
        (price_id, "pro-tokens", 3)
    ]


def test_a_version_takes_the_number_after_the_highest_taken(session) -> None:
    """`KEY@v2` stored (before keys with `@` were refused), `KEY` retired: `KEY@v3`, not the
    count of versions plus one (`@v2`, taken)."""
    plan = Plan(key="pro", name="Pro")
    session.add(plan)
    session.flush()
    for key in ("pro-tokens", "pro-tokens@v2", "pro-tokens@vx"):
        plan_id = plan.id if key == "pro-tokens" else None
        session.add(Price(key=key, plan_id=plan_id, currency="usd", metric="tokens", unit_amount=2))
    session.flush()
    _retire(session, "pro-tokens")
    keys = sorted(session.scalars(select(Price.key)))
    assert keys == ["pro-tokens@v2", "pro-tokens@v3", "pro-tokens@vx"]
