"""Plans, prices, subscriptions and invoices: admin changes and reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing.models import Invoice, InvoiceLine, Price, Subscription
from webhooks.models import WebhookEvent

from .conftest import NOW

PLAN = {
    "key": "pro",
    "name": "Pro",
    "entitlements": [
        {"key": "tokens", "limit_per_window": 1000, "window": "day"},
        {"key": "tokens", "limit_per_window": 20000, "window": "month"},
    ],
}


def test_creating_then_changing_a_plan(client, operator) -> None:
    created = client.post("/_billing/plans", json=PLAN, headers=operator)
    assert created.status_code == 201
    changed = client.post(
        "/_billing/plans",
        json={
            "key": "pro",
            "name": "Pro 2",
            "description": "more",
            "entitlements": [{"key": "calls", "limit_per_window": 5, "window": "day"}],
        },
        headers=operator,
    )
    assert changed.status_code == 200
    assert changed.json()["id"] == created.json()["id"]
    listed = client.get("/_billing/plans", headers=operator).json()["items"]
    assert [(p["name"], p["description"]) for p in listed] == [("Pro 2", "more")]
    assert listed[0]["entitlements"] == [{"key": "calls", "limit_per_window": 5, "window": "day"}]


def test_changing_a_plan_without_entitlements_keeps_them(client, operator) -> None:
    client.post("/_billing/plans", json=PLAN, headers=operator)
    client.post("/_billing/plans", json={"key": "pro", "name": "Renamed"}, headers=operator)
    [plan] = client.get("/_billing/plans", headers=operator).json()["items"]
    assert len(plan["entitlements"]) == 2


def test_an_entitlement_listed_twice_is_refused(client, operator) -> None:
    twice = [{"key": "t", "limit_per_window": 1, "window": "day"}] * 2
    response = client.post(
        "/_billing/plans", json={"key": "p", "name": "P", "entitlements": twice}, headers=operator
    )
    assert (response.status_code, response.json()["field"]) == (422, "entitlements")


def test_prices_are_created_and_changed_with_exact_decimals(
    client, operator, session_factory
) -> None:
    client.post("/_billing/plans", json=PLAN, headers=operator)
    price = {
        "key": "tokens-usd",
        "currency": "USD",
        "plan_key": "pro",
        "metric": "tokens",
        "unit_amount_decimal": "0.000200000001",
    }
    created = client.post("/_billing/prices", json=price, headers=operator)
    assert created.status_code == 201
    assert (created.json()["currency"], created.json()["unit_amount_decimal"]) == (
        "usd",
        "0.000200000001",
    )
    tiered = {
        **price,
        "billing_scheme": "tiered",
        "tiers_mode": "graduated",
        "tiers": [
            {"up_to": 1000, "unit_amount_decimal": "0.5"},
            {"up_to": None, "unit_amount_decimal": "0.25", "flat_amount": 100},
        ],
        "unit_amount_decimal": None,
    }
    changed = client.post("/_billing/prices", json=tiered, headers=operator)
    assert changed.status_code == 200
    with session_factory() as session:
        stored = session.execute(select(Price)).scalar_one()
        assert stored.billing_scheme == "tiered"
        assert stored.tiers[1] == {"up_to": None, "unit_amount_decimal": "0.25", "flat_amount": 100}
    plans = client.get("/_billing/plans", headers=operator).json()["items"]
    assert plans[0]["prices"][0]["key"] == "tokens-usd"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"unit_amount": None}, "unit_amount"),
        ({"plan_key": "nope"}, "plan_key"),
        ({"currency": "dollars"}, "currency"),
        ({"unit_amount_decimal": "0.1e3"}, "unit_amount_decimal"),
        ({"unit_amount_decimal": 0.5}, "unit_amount_decimal"),
        ({"billing_scheme": "tiered", "tiers_mode": "volume"}, "metric"),
        (
            {
                "billing_scheme": "tiered",
                "metric": "t",
                "tiers_mode": "volume",
                "tiers": [{"up_to": 10}],
            },
            "tiers",
        ),
        ({"billing_scheme": "tiered", "metric": "t", "tiers": [{"up_to": None}]}, "tiers_mode"),
    ],
)
def test_a_malformed_price_is_refused_naming_the_field(
    client, operator, session_factory, change, field
) -> None:
    price = {"key": "p", "currency": "usd", "unit_amount": 100, **change}
    response = client.post("/_billing/prices", json=price, headers=operator)
    assert response.status_code == 422
    assert response.json()["field"] == field
    with session_factory() as session:
        assert session.execute(select(Price)).first() is None


def test_subscribing_ends_the_open_subscription_at_the_change(client, operator, clock) -> None:
    client.post("/_billing/plans", json=PLAN, headers=operator)
    client.post("/_billing/plans", json={"key": "basic", "name": "Basic"}, headers=operator)
    first = client.post(
        "/_billing/subscriptions", json={"tenant_id": "A", "plan_key": "basic"}, headers=operator
    )
    assert first.status_code == 201
    assert first.json()["effective_at"] == "2025-03-15T12:00:00Z"
    clock.now += timedelta(days=3)
    second = client.post(
        "/_billing/subscriptions", json={"tenant_id": "A", "plan_key": "pro"}, headers=operator
    )
    items = client.get("/_billing/tenants/A/subscriptions", headers=operator).json()["items"]
    assert [(s["plan_key"], s["ended_at"]) for s in items] == [
        ("basic", second.json()["effective_at"]),
        ("pro", None),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tenant_id": "A", "plan_key": "missing"}, "plan_key"),
        (
            {
                "tenant_id": "A",
                "plan_key": "pro",
                "effective_at": NOW.isoformat(),
                "ended_at": NOW.isoformat(),
            },
            "ended_at",
        ),
        (
            {"tenant_id": "A", "plan_key": "pro", "effective_at": "2025-03-15T12:00:00"},
            "effective_at",
        ),
        ({"plan_key": "pro"}, "tenant_id"),
    ],
)
def test_a_bad_subscription_is_refused(client, operator, body, field) -> None:
    client.post("/_billing/plans", json=PLAN, headers=operator)
    response = client.post("/_billing/subscriptions", json=body, headers=operator)
    assert (response.status_code, response.json()["field"]) == (422, field)


def test_cancelling_ends_a_subscription_once(client, operator, clock, session_factory) -> None:
    client.post("/_billing/plans", json=PLAN, headers=operator)
    sub = client.post(
        "/_billing/subscriptions", json={"tenant_id": "A", "plan_key": "pro"}, headers=operator
    ).json()
    clock.now += timedelta(days=1)
    path = f"/_billing/subscriptions/{sub['id']}/cancel"
    cancelled = client.post(path, headers=operator)
    assert cancelled.json()["ended_at"] == "2025-03-16T12:00:00Z"
    clock.now += timedelta(days=1)
    again = client.post(path, json={"at": "2025-03-20T00:00:00Z"}, headers=operator)
    assert again.json()["ended_at"] == "2025-03-16T12:00:00Z"
    early = client.post(path, json={"at": "2025-03-01T00:00:00Z"}, headers=operator)
    assert (early.status_code, early.json()["field"]) == (422, "at")
    with session_factory() as session:
        ended = session.execute(select(Subscription.ended_at)).scalar_one()
    assert ended == datetime(2025, 3, 16, 12, tzinfo=UTC)


@pytest.fixture
def invoices(session_factory) -> list[str]:
    with session_factory.begin() as session:
        rows = [
            Invoice(
                tenant_id="A",
                period_start=datetime(2025, month, 1, tzinfo=UTC),
                period_end=datetime(2025, month + 1, 1, tzinfo=UTC),
                total_amount=100 * month,
                currency="usd",
                status="paid" if month == 1 else "open",
            )
            for month in range(1, 6)
        ]
        session.add_all(rows)
        session.flush()
        session.add(InvoiceLine(invoice_id=rows[1].id, metric="tokens", quantity=2, amount=200))
        return [row.id for row in rows]


def test_invoices_are_listed_page_by_page(client, a_key, invoices) -> None:
    seen, cursor = [], None
    for _ in range(10):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/_billing/invoices", params=params, headers=a_key).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == invoices


def test_an_invoice_is_read_with_its_lines(client, a_key, invoices) -> None:
    body = client.get(f"/_billing/invoices/{invoices[1]}", headers=a_key).json()
    assert (body["total_amount"], body["status"], body["currency"]) == (200, "open", "usd")
    assert [(line["metric"], line["quantity"], line["amount"]) for line in body["lines"]] == [
        ("tokens", 2, 200)
    ]
    missing = client.get("/_billing/invoices/00000000-0000-0000-0000-000000000000", headers=a_key)
    assert missing.status_code == 404
    assert client.get("/_billing/invoices/not%20an%20id", headers=a_key).status_code == 422


def test_voiding_an_open_invoice_and_not_a_paid_one(client, operator, invoices) -> None:
    voided = client.post(f"/_billing/invoices/{invoices[1]}/void", headers=operator)
    assert voided.json()["status"] == "void"
    assert (
        client.post(f"/_billing/invoices/{invoices[1]}/void", headers=operator).status_code == 200
    )
    paid = client.post(f"/_billing/invoices/{invoices[0]}/void", headers=operator)
    assert paid.status_code == 409
    assert (
        client.get(f"/_billing/tenants/A/invoices/{invoices[0]}", headers=operator).json()["status"]
        == "paid"
    )


def test_paying_and_marking_uncollectible_follow_the_lifecycle(
    client, operator, a_key, invoices, session_factory
) -> None:
    uncollectible = client.post(
        f"/_billing/invoices/{invoices[2]}/mark-uncollectible", headers=operator
    )
    assert uncollectible.json()["status"] == "uncollectible"
    paid = client.post(f"/_billing/invoices/{invoices[2]}/pay", headers=operator)
    assert (paid.status_code, paid.json()["status"]) == (200, "paid")
    assert paid.json()["paid_at"] is not None
    refused = client.post(f"/_billing/invoices/{invoices[2]}/mark-uncollectible", headers=operator)
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:billing:problem:invoice-state"
    assert refused.json()["invoice_status"] == "paid"
    assert client.post(f"/_billing/invoices/{invoices[3]}/pay", headers=a_key).status_code == 403
    with session_factory() as session:
        topics = sorted(session.execute(select(WebhookEvent.topic)).scalars())
    assert topics == ["billing.invoice.marked_uncollectible", "billing.invoice.paid"]


def test_an_operator_finalizes_a_draft_now(client, operator, invoices, session_factory) -> None:
    with session_factory.begin() as session:
        draft = Invoice(
            tenant_id="A",
            period_start=datetime(2024, 12, 1, tzinfo=UTC),
            period_end=datetime(2025, 1, 1, tzinfo=UTC),
            total_amount=0,
            currency="usd",
            status="draft",
        )
        session.add(draft)
    finalized = client.post(f"/_billing/invoices/{draft.id}/finalize", headers=operator)
    assert (finalized.status_code, finalized.json()["status"]) == (200, "open")
    assert finalized.json()["number"] == "INV-000001"
    paid = client.post(f"/_billing/invoices/{invoices[0]}/finalize", headers=operator)
    assert (paid.status_code, paid.json()["invoice_status"]) == (409, "paid")


def test_an_operator_credits_an_invoice_and_the_tenant_sees_it(
    client, operator, a_key, invoices
) -> None:
    path = f"/_billing/invoices/{invoices[1]}/credit-notes"  # open, $2.00
    created = client.post(path, json={"amount": 150, "reason": "outage"}, headers=operator)
    assert created.status_code == 201
    assert (created.json()["number"], created.json()["amount"]) == ("CN-000001", 150)
    over = client.post(path, json={"amount": 51, "reason": "too much"}, headers=operator)
    assert (over.status_code, over.json()["available"]) == (409, 50)
    assert over.json()["type"] == "urn:billing:problem:credit-exceeds-invoice"
    both = client.post(
        path, json={"amount": 5, "lines": [{"amount": 5}], "reason": "x"}, headers=operator
    )
    assert (both.status_code, both.json()["type"]) == (
        422,
        "urn:billing:problem:invalid-credit-note",
    )
    detail = client.get(f"/_billing/invoices/{invoices[1]}", headers=a_key).json()
    assert [(n["number"], n["amount"], n["reason"]) for n in detail["credit_notes"]] == [
        ("CN-000001", 150, "outage")
    ]
