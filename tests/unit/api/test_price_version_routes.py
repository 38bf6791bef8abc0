"""`POST /_billing/prices` on a price an invoice bills makes a new version of it: the invoices
issued keep their amounts, and the next invoice neither bills nor credits their periods again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing import BillingService
from billing.models import Invoice, InvoiceLine, Price

JAN, FEB, MAR = (datetime(2025, month, 1, tzinfo=UTC) for month in (1, 2, 3))
DAY = timedelta(days=1)
PRICE = {"key": "pro-tokens", "currency": "usd", "plan_key": "pro", "metric": "tokens"}


def priced(client, operator, unit_amount: int) -> dict:
    response = client.post(
        "/_billing/prices", json={**PRICE, "unit_amount": unit_amount}, headers=operator
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def paid_january(client, operator, session_factory, ended_at=None) -> str:
    """Tenant A's 1,000 tokens at 2 in January, invoiced (2,000) and paid."""
    client.post("/_billing/plans", json={"key": "pro", "name": "Pro"}, headers=operator)
    priced(client, operator, 2)
    subscription = {"tenant_id": "A", "plan_key": "pro", "effective_at": JAN.isoformat()}
    if ended_at is not None:
        subscription["ended_at"] = ended_at.isoformat()
    assert (
        client.post("/_billing/subscriptions", json=subscription, headers=operator).status_code
        == 201
    )
    with session_factory.begin() as session:
        billing = BillingService(session=session, tenant_id="A", now=lambda: FEB + DAY)
        billing.record_usage(metric="tokens", amount=1000, at=JAN + 5 * DAY, idempotency_key="jan")
        invoice_id = billing.generate_monthly_invoice(
            period_start=JAN, period_end=FEB, currency="usd"
        )
        billing.pay_invoice(invoice_id)
    return invoice_id


def february(session_factory, late: int = 0) -> tuple[list[tuple], int]:
    """Tenant A's February invoice (100 tokens, and `late` more of January): its lines as
    (kind, price key, price's unit amount, quantity, amount), and its total."""
    with session_factory.begin() as session:
        billing = BillingService(session=session, tenant_id="A", now=lambda: MAR + DAY)
        billing.record_usage(metric="tokens", amount=100, at=FEB + 5 * DAY, idempotency_key="feb")
        if late:
            billing.record_usage(
                metric="tokens", amount=late, at=JAN + 20 * DAY, idempotency_key="late"
            )
        invoice_id = billing.generate_monthly_invoice(
            period_start=FEB, period_end=MAR, currency="usd"
        )
        return invoice_lines(session, invoice_id), session.get(Invoice, invoice_id).total_amount


def invoice_lines(session, invoice_id: str) -> list[tuple]:
    rows = session.execute(
        select(InvoiceLine.kind, Price.key, Price.unit_amount, InvoiceLine.quantity)
        .add_columns(InvoiceLine.amount)
        .join(Price, Price.id == InvoiceLine.price_id)
        .where(InvoiceLine.invoice_id == invoice_id)
    )
    return sorted(tuple(row) for row in rows)


@pytest.mark.parametrize("ended_at", [None, FEB], ids=["live", "ended"])
def test_changing_a_price_a_paid_invoice_bills_makes_a_new_version(
    client, operator, session_factory, ended_at
) -> None:
    january = paid_january(client, operator, session_factory, ended_at)
    old_id = priced(client, operator, 2)["id"]  # the same terms again: nothing changes
    changed = client.post("/_billing/prices", json={**PRICE, "unit_amount": 3}, headers=operator)
    assert changed.status_code == 200
    assert (changed.json()["key"], changed.json()["unit_amount"]) == ("pro-tokens", 3)
    assert changed.json()["id"] != old_id
    with session_factory() as session:
        old = session.get(Price, old_id)
        assert (old.key, old.plan_id, old.unit_amount) == ("pro-tokens@v1", None, 2)
        assert invoice_lines(session, january) == [("charge", "pro-tokens@v1", 2, 1000, 2000)]
        assert session.get(Invoice, january).total_amount == 2000
    lines, total = february(session_factory)
    if ended_at is None:
        assert (lines, total) == ([("charge", "pro-tokens", 3, 100, 300)], 300)
    else:  # no subscription in February: nothing billed, January not again
        assert (lines, total) == ([], 0)


def test_late_usage_after_a_price_change_is_billed_at_the_invoice_s_price(
    client, operator, session_factory
) -> None:
    paid_january(client, operator, session_factory)
    priced(client, operator, 3)
    lines, total = february(session_factory, late=10)
    assert lines == [
        ("adjustment", "pro-tokens@v1", 2, 10, 20),
        ("charge", "pro-tokens", 3, 100, 300),
    ]
    assert total == 320


def test_a_price_nothing_bills_is_changed_in_place(client, operator, session_factory) -> None:
    client.post("/_billing/plans", json={"key": "pro", "name": "Pro"}, headers=operator)
    created = priced(client, operator, 2)
    changed = client.post("/_billing/prices", json={**PRICE, "unit_amount": 3}, headers=operator)
    assert changed.status_code == 200
    assert (changed.json()["id"], changed.json()["unit_amount"]) == (created["id"], 3)
    with session_factory() as session:
        assert session.execute(select(Price.id, Price.key, Price.unit_amount)).all() == [
            (created["id"], "pro-tokens", 3)
        ]


@pytest.mark.parametrize("key", ["k" * 91, "pro@tokens", "pro-tokens@v2"])
def test_a_price_key_over_90_characters_or_with_an_at_sign_is_refused(
    client, operator, session_factory, key
) -> None:
    """Room for the `@vN` of the price's old versions (a key of 100 would become 103), and no
    key that reads as one of them: as in a catalogue file."""
    client.post("/_billing/plans", json={"key": "pro", "name": "Pro"}, headers=operator)
    refused = client.post(
        "/_billing/prices", json={**PRICE, "key": key, "unit_amount": 2}, headers=operator
    )
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"
    with session_factory() as session:
        assert session.scalars(select(Price.key)).all() == []


def test_a_billed_price_of_a_90_character_key_gets_a_version(
    client, operator, session_factory
) -> None:
    key = "k" * 90
    client.post("/_billing/plans", json={"key": "pro", "name": "Pro"}, headers=operator)
    first = {**PRICE, "key": key, "unit_amount": 2}
    assert client.post("/_billing/prices", json=first, headers=operator).status_code == 201
    subscription = {"tenant_id": "A", "plan_key": "pro", "effective_at": JAN.isoformat()}
    client.post("/_billing/subscriptions", json=subscription, headers=operator)
    with session_factory.begin() as session:
        billing = BillingService(session=session, tenant_id="A", now=lambda: FEB + DAY)
        billing.record_usage(metric="tokens", amount=1, at=JAN + DAY, idempotency_key="jan")
        billing.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    changed = client.post("/_billing/prices", json={**first, "unit_amount": 3}, headers=operator)
    assert changed.status_code == 200
    with session_factory() as session:
        assert sorted(session.scalars(select(Price.key))) == [key, f"{key}@v1"]
