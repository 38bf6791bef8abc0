"""GET /invoices/upcoming: the caller's current month so far, priced as its invoice would be,
storing nothing; tenants see only their own; bad currencies are problems."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from billing import BillingService, InvoicePolicy
from billing.models import Invoice
from tests.unit.billing.test_lifecycle import seed_plan
from webhooks.models import WebhookEvent

from .conftest import NOW

FEBRUARY = datetime(2025, 2, 1, tzinfo=UTC)
MARCH = datetime(2025, 3, 1, tzinfo=UTC)
APRIL = datetime(2025, 4, 1, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def usage(session_factory) -> None:
    """Tenant A: 100 tokens in March, 5 in February; tenant B: 999 in March; both on Pro."""
    with session_factory.begin() as session:
        seed_plan(session, tenants=("A", "B"))
        for tenant, amount, at, key in [
            ("A", 100, MARCH, "a-march"),
            ("A", 5, datetime(2025, 2, 28, tzinfo=UTC), "a-february"),
            ("B", 999, NOW, "b-march"),
        ]:
            BillingService(session=session, tenant_id=tenant, now=lambda: NOW).record_usage(
                metric="tokens", amount=amount, at=at, idempotency_key=key
            )


def test_the_upcoming_invoice_is_this_month_so_far(client, a_key, usage, session_factory):
    response = client.get("/_billing/invoices/upcoming?currency=usd", headers=a_key)
    assert response.status_code == 200
    assert response.json() == {
        "tenant_id": "A",
        "period_start": "2025-03-01T00:00:00Z",
        "period_end": "2025-04-01T00:00:00Z",
        "currency": "usd",
        "total_amount": 1200,
        "lines": [
            {
                "price_id": response.json()["lines"][0]["price_id"],
                "metric": None,
                "quantity": 1,
                "amount": 1000,
                "dimensions": None,
            },
            {
                "price_id": response.json()["lines"][1]["price_id"],
                "metric": "tokens",
                "quantity": 100,
                "amount": 200,
                "dimensions": None,
            },
        ],
    }
    with session_factory() as session:
        assert session.execute(select(func.count()).select_from(Invoice)).scalar_one() == 0
        assert session.execute(select(func.count()).select_from(WebhookEvent)).scalar_one() == 0


def test_an_operator_previews_any_tenant_and_a_tenant_only_its_own(
    client, operator, make_key, usage
) -> None:
    b_key = make_key("B", ("billing.read",))
    own = client.get("/_billing/invoices/upcoming", params={"currency": "usd"}, headers=b_key)
    assert (own.json()["tenant_id"], own.json()["total_amount"]) == ("B", 1000 + 2 * 999)
    path = "/_billing/tenants/A/invoices/upcoming?currency=usd"
    assert client.get(path, headers=operator).json()["total_amount"] == 1200
    assert client.get(path, headers=b_key).status_code == 403
    assert client.get("/_billing/invoices/upcoming?currency=usd").status_code == 401


def test_the_preview_follows_the_clock_into_the_next_month(client, a_key, usage, clock) -> None:
    clock.now = APRIL
    body = client.get("/_billing/invoices/upcoming?currency=usd", headers=a_key).json()
    assert (body["period_start"], body["total_amount"]) == ("2025-04-01T00:00:00Z", 1000)


@pytest.mark.parametrize(
    ("query", "slug"),
    [
        ("?currency=dollars", "invalid-period"),
        ("?currency=u%00d", "invalid-period"),
        ("?currency=eur", "currency-mismatch"),
        ("?currency=" + "x" * 17, "validation"),
        ("", "validation"),
    ],
)
def test_a_bad_currency_is_a_problem(client, a_key, usage, query, slug) -> None:
    response = client.get(f"/_billing/invoices/upcoming{query}", headers=a_key)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(slug)


def test_usage_posted_for_a_drafts_period_re_prices_the_draft_the_tenant_reads(
    client, a_key, usage, session_factory
) -> None:
    with session_factory.begin() as session:
        draft_id = BillingService(
            session=session, tenant_id="A", now=lambda: NOW, policy=InvoicePolicy(grace_period=DAY)
        ).generate_monthly_invoice(period_start=FEBRUARY, period_end=MARCH, currency="usd")
    assert (
        client.get(f"/_billing/invoices/{draft_id}", headers=a_key).json()["total_amount"] == 1010
    )
    body = {"metric": "tokens", "amount": 45, "at": "2025-02-20T00:00:00Z", "idempotency_key": "k"}
    for status in (202, 200):  # the retry is a duplicate: nothing more
        assert client.post("/_billing/usage", json=body, headers=a_key).status_code == status
    draft = client.get(f"/_billing/invoices/{draft_id}", headers=a_key).json()
    assert (draft["id"], draft["status"], draft["total_amount"]) == (draft_id, "draft", 1100)
    assert sorted((line["metric"] or "", line["quantity"]) for line in draft["lines"]) == [
        ("", 1),
        ("tokens", 50),
    ]


def test_the_invoice_routes_follow_the_deployments_policy_and_clock(
    session_factory, operator, a_key, usage
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from billing.api import add_billing

    app = FastAPI()
    policy = InvoicePolicy(number_prefix="ACME-", grace_period=DAY, late_usage="ignore")
    add_billing(app, session_factory=session_factory, clock=lambda: NOW, invoice_policy=policy)
    with session_factory.begin() as session:
        draft_id = BillingService(
            session=session, tenant_id="A", now=lambda: NOW, policy=policy
        ).generate_monthly_invoice(period_start=FEBRUARY, period_end=MARCH, currency="usd")
    with TestClient(app) as client:
        finalized = client.post(f"/_billing/invoices/{draft_id}/finalize", headers=operator)
        paid = client.post(f"/_billing/invoices/{draft_id}/pay", headers=operator)
    assert (finalized.json()["number"], finalized.json()["finalized_at"]) == (
        "ACME-000001",
        "2025-03-15T12:00:00Z",
    )
    assert paid.json()["paid_at"] == "2025-03-15T12:00:00Z"


def test_usage_posted_re_prices_a_draft_with_the_deployments_late_usage_lookback(
    session_factory, a_key, usage
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from billing.api import add_billing

    # January (ended 42 days before NOW) is inside a 60-day lookback, outside the default 35.
    policy = InvoicePolicy(grace_period=DAY, late_usage_lookback=timedelta(days=60))
    january = datetime(2025, 1, 1, tzinfo=UTC)
    with session_factory.begin() as session:
        BillingService(
            session=session, tenant_id="A", now=lambda: NOW, policy=InvoicePolicy()
        ).generate_monthly_invoice(period_start=january, period_end=FEBRUARY, currency="usd")
        a = BillingService(session=session, tenant_id="A", now=lambda: NOW, policy=policy)
        a.record_usage(metric="tokens", amount=10, at=january + DAY, idempotency_key="late")
        draft_id = a.generate_monthly_invoice(
            period_start=FEBRUARY, period_end=MARCH, currency="usd"
        )
    app = FastAPI()
    add_billing(app, session_factory=session_factory, clock=lambda: NOW, invoice_policy=policy)
    body = {"metric": "tokens", "amount": 45, "at": "2025-02-20T00:00:00Z", "idempotency_key": "k"}
    with TestClient(app) as client:
        assert client.post("/_billing/usage", json=body, headers=a_key).status_code == 202
        draft = client.get(f"/_billing/invoices/{draft_id}", headers=a_key).json()
    # The fee, 50 tokens of February and January's 10 late tokens as an adjustment.
    assert (draft["status"], draft["total_amount"]) == ("draft", 1000 + 2 * 50 + 2 * 10)
