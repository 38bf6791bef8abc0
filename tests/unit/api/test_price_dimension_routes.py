"""POST /_billing/prices with dimensions; invoice lines show the group they bill."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from billing import BillingService
from billing.meters import declare_meter
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription

from .conftest import NOW

PLAN = {"key": "ai", "name": "AI"}
GPT4 = {
    "key": "gpt4",
    "currency": "usd",
    "plan_key": "ai",
    "metric": "tokens",
    "unit_amount": 3,
    "dimensions": {"model": "gpt-4"},
}


@pytest.fixture
def catalogue(client, operator) -> None:
    client.post("/_billing/plans", json=PLAN, headers=operator)
    meter = {"key": "tokens", "group_by": ["model", "region"]}
    assert client.post("/_billing/meters", json=meter, headers=operator).status_code == 201


def test_a_price_with_dimensions_is_created_and_listed(client, operator, catalogue) -> None:
    created = client.post("/_billing/prices", json=GPT4, headers=operator)
    assert created.status_code == 201
    assert created.json()["dimensions"] == {"model": "gpt-4"}
    (plan,) = client.get("/_billing/plans", headers=operator).json()["items"]
    assert plan["prices"][0]["dimensions"] == {"model": "gpt-4"}


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"dimensions": {"model": 4}}, None),
        ({"dimensions": {}}, None),
        ({"dimensions": {"bad key": "a"}}, None),
        ({"dimensions": {"model": "x" * 101}}, None),
        ({"dimensions": {"tier": "pro"}}, "not in the group_by"),
        ({"key": "eu", "dimensions": {"region": "eu"}}, "names as many properties"),
    ],
)
def test_a_malformed_or_ambiguous_price_is_a_problem_and_stores_nothing(
    client, operator, session_factory, catalogue, change, detail
) -> None:
    assert client.post("/_billing/prices", json=GPT4, headers=operator).status_code == 201
    response = client.post(
        "/_billing/prices", json={**GPT4, "key": "p2", **change}, headers=operator
    )
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["field"] == "dimensions" or body["field"].startswith("dimensions")
    if detail:
        assert detail in body["detail"]
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Price)) == 1


def test_invoice_lines_carry_their_group(client, a_key, session_factory) -> None:
    with session_factory.begin() as session:
        invoice = Invoice(
            tenant_id="A",
            period_start=datetime(2025, 1, 1, tzinfo=UTC),
            period_end=datetime(2025, 2, 1, tzinfo=UTC),
            total_amount=30,
            currency="usd",
            status="open",
        )
        session.add(invoice)
        session.flush()
        session.add_all(
            [
                InvoiceLine(
                    invoice_id=invoice.id,
                    metric="tokens",
                    quantity=10,
                    amount=30,
                    dimensions={"model": "gpt-4", "region": None},
                ),
                InvoiceLine(invoice_id=invoice.id, metric="calls", quantity=1, amount=0),
            ]
        )
        invoice_id = invoice.id
    body = client.get(f"/_billing/invoices/{invoice_id}", headers=a_key).json()
    assert sorted((line["metric"], line["dimensions"]) for line in body["lines"]) == [
        ("calls", None),
        ("tokens", {"model": "gpt-4", "region": None}),
    ]


def test_the_upcoming_invoice_shows_a_line_per_group(client, a_key, session_factory) -> None:
    with session_factory.begin() as session:
        declare_meter(session, key="tokens", group_by=["model"])
        plan = Plan(key="ai", name="AI")
        session.add(plan)
        session.flush()
        session.add_all(
            [
                Price(
                    key="gpt4",
                    plan_id=plan.id,
                    currency="usd",
                    metric="tokens",
                    unit_amount=3,
                    dimensions={"model": "gpt-4"},
                ),
                Price(key="rest", plan_id=plan.id, currency="usd", metric="tokens", unit_amount=1),
                Subscription(
                    tenant_id="A", plan_id=plan.id, effective_at=datetime(2025, 1, 1, tzinfo=UTC)
                ),
            ]
        )
        bs = BillingService(session=session, tenant_id="A", now=lambda: NOW)
        for key, model, amount in [("1", "gpt-4", 10), ("2", "claude", 7), ("3", "gpt-4", 1)]:
            bs.record_usage(
                metric="tokens",
                amount=amount,
                at=NOW,
                idempotency_key=key,
                metadata={"model": model},
            )
    body = client.get("/_billing/invoices/upcoming?currency=usd", headers=a_key).json()
    assert [(ln["dimensions"], ln["quantity"], ln["amount"]) for ln in body["lines"]] == [
        ({"model": "gpt-4"}, 11, 33),
        ({"model": "claude"}, 7, 7),
    ]
    assert body["total_amount"] == 40
