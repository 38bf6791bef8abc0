"""Tenant B, with every scope (even `billing.admin` on an old key), tries every route against
tenant A's data and the shared catalogue: it sees none of A's data, changes none of it nor the
catalogue, and its own writes land in its own tenant. Operator keys act on any tenant."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from billing import BillingService
from billing.api.keys import hash_key
from billing.api.models import ApiKey
from billing.models import (
    Invoice,
    InvoiceLine,
    Plan,
    PlanEntitlement,
    Price,
    Subscription,
    UsageEvent,
)

from .conftest import NOW, READ_WRITE

ALL_SCOPES = ["billing.read", "billing.write", "billing.admin"]


@pytest.fixture
def legacy_key(session_factory) -> Callable[[str], dict[str, str]]:
    """A tenant's key holding `billing.admin` as keys could before operator keys (a row as an
    un-migrated database or a hand-made insert holds it; `create_key` refuses to make one)."""

    def make(tenant: str) -> dict[str, str]:
        plaintext = f"bk_legacy-{tenant}-0123456789abcdef0123456789abcdef"
        with session_factory.begin() as session:
            session.add(
                ApiKey(
                    tenant_id=tenant,
                    prefix=plaintext[:11],
                    key_hash=hash_key(plaintext),
                    scopes=ALL_SCOPES,
                )
            )
        return {"Authorization": f"Bearer {plaintext}"}

    return make


@pytest.fixture
def tenant_a(session_factory) -> dict[str, str]:
    """Tenant A's usage, subscription (with quotas) and invoice."""
    with session_factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        session.add(
            PlanEntitlement(plan_id=plan.id, key="tokens", window="day", limit_per_window=50)
        )
        session.add(
            Price(key="pro-tokens", plan_id=plan.id, currency="usd", metric="tokens", unit_amount=2)
        )
        subscription = Subscription(
            tenant_id="A", plan_id=plan.id, effective_at=NOW - timedelta(days=10)
        )
        invoice = Invoice(
            tenant_id="A",
            period_start=datetime(2025, 2, 1, tzinfo=UTC),
            period_end=datetime(2025, 3, 1, tzinfo=UTC),
            total_amount=1234,
            currency="usd",
        )
        session.add_all([subscription, invoice])
        session.flush()
        session.add(InvoiceLine(invoice_id=invoice.id, metric="tokens", quantity=40, amount=1234))
        event_id = BillingService(session=session, tenant_id="A").record_usage(
            metric="tokens", amount=40, at=NOW, idempotency_key="shared-key"
        )
        return {"subscription": subscription.id, "invoice": invoice.id, "event": event_id}


def snapshot(session_factory) -> tuple:
    """Everything of tenant A's that a route could change, and the shared catalogue."""
    with session_factory() as session:
        return (
            session.execute(select(Plan.key, Plan.name).order_by(Plan.key)).all(),
            session.execute(select(PlanEntitlement.key, PlanEntitlement.limit_per_window)).all(),
            session.execute(select(Price.key, Price.unit_amount, Price.plan_id)).all(),
            session.execute(
                select(UsageEvent.id, UsageEvent.amount).where(UsageEvent.tenant_id == "A")
            ).all(),
            session.execute(
                select(Subscription.id, Subscription.ended_at).where(Subscription.tenant_id == "A")
            ).all(),
            session.execute(
                select(Invoice.id, Invoice.status).where(Invoice.tenant_id == "A")
            ).all(),
        )


def b_events(session_factory) -> int:
    with session_factory() as session:
        return session.execute(select(func.count()).where(UsageEvent.tenant_id == "B")).scalar_one()


USAGE = {"metric": "tokens", "amount": 7, "idempotency_key": "shared-key"}

# (method, route path) → what B does there and what it must see.
Case = Callable[..., None]


def usage_post(client, b, a, session_factory) -> None:
    response = client.post("/_billing/usage", json=USAGE, headers=b)
    assert response.status_code == 202  # A's key is not B's: no duplicate, no conflict
    assert response.json()["id"] != a["event"]
    assert b_events(session_factory) == 1


def usage_batch(client, b, a, session_factory) -> None:
    response = client.post("/_billing/usage/batch", json={"events": [USAGE]}, headers=b)
    assert response.json()["results"][0]["status"] == "accepted"
    assert response.json()["results"][0]["id"] != a["event"]


def usage_get(client, b, a, session_factory) -> None:
    for granularity in ("day", "month"):
        response = client.get("/_billing/usage", params={"granularity": granularity}, headers=b)
        assert response.json()["items"] == []


def plans_get(client, b, a, session_factory) -> None:
    # The catalogue is shared by design; it holds no tenant's data.
    body = client.get("/_billing/plans", headers=b).json()
    assert [p["key"] for p in body["items"]] == ["pro"]
    assert "tenant_id" not in str(body)


def plans_post(client, b, a, session_factory) -> None:
    # Tenant A's admin key emptied B's entitlements: the catalogue is the operators' alone.
    emptied = {"key": "pro", "name": "Pro", "entitlements": []}
    assert client.post("/_billing/plans", json=emptied, headers=b).status_code == 403
    new = {"key": "b-plan", "name": "B"}
    assert client.post("/_billing/plans", json=new, headers=b).status_code == 403


def prices_post(client, b, a, session_factory) -> None:
    # ... and re-priced its prices.
    repriced = {"key": "pro-tokens", "currency": "usd", "metric": "tokens", "unit_amount": 0}
    response = client.post("/_billing/prices", json=repriced, headers=b)
    assert (response.status_code, response.json()["scope"]) == (403, "billing.admin")


def meters_get(client, b, a, session_factory) -> None:
    # Meters are shared like the catalogue; they hold no tenant's data.
    body = client.get("/_billing/meters", headers=b).json()
    assert "tenant_id" not in str(body)


def meters_post(client, b, a, session_factory) -> None:
    # ... and only operators declare them: a tenant could otherwise turn a sum into a max.
    response = client.post(
        "/_billing/meters", json={"key": "tokens", "aggregation": "max"}, headers=b
    )
    assert (response.status_code, response.json()["scope"]) == (403, "billing.admin")


def subscriptions_get(client, b, a, session_factory) -> None:
    assert client.get("/_billing/subscriptions", headers=b).json()["items"] == []


def subscriptions_post(client, b, a, session_factory) -> None:
    for tenant in ("A", "B"):
        body = {"tenant_id": tenant, "plan_key": "pro"}
        assert client.post("/_billing/subscriptions", json=body, headers=b).status_code == 403


def subscription_cancel(client, b, a, session_factory) -> None:
    path = f"/_billing/subscriptions/{a['subscription']}/cancel"
    assert client.post(path, headers=b).status_code == 403


def tenant_subscriptions_get(client, b, a, session_factory) -> None:
    for tenant in ("A", "B"):
        path = f"/_billing/tenants/{tenant}/subscriptions"
        assert client.get(path, headers=b).status_code == 403


def tenant_invoices_get(client, b, a, session_factory) -> None:
    assert client.get("/_billing/tenants/A/invoices", headers=b).status_code == 403


def invoice_lines_get(client, b, a, session_factory) -> None:
    assert client.get(f"/_billing/invoices/{a['invoice']}/lines", headers=b).status_code == 404


def tenant_invoice_lines_get(client, b, a, session_factory) -> None:
    path = f"/_billing/tenants/A/invoices/{a['invoice']}/lines"
    assert client.get(path, headers=b).status_code == 403


def tenant_invoice_get(client, b, a, session_factory) -> None:
    path = f"/_billing/tenants/A/invoices/{a['invoice']}"
    assert client.get(path, headers=b).status_code == 403


def invoices_get(client, b, a, session_factory) -> None:
    assert client.get("/_billing/invoices", headers=b).json()["items"] == []


def invoice_get(client, b, a, session_factory) -> None:
    assert client.get(f"/_billing/invoices/{a['invoice']}", headers=b).status_code == 404


def invoice_void(client, b, a, session_factory) -> None:
    assert client.post(f"/_billing/invoices/{a['invoice']}/void", headers=b).status_code == 403


def invoice_finalize(client, b, a, session_factory) -> None:
    path = f"/_billing/invoices/{a['invoice']}/finalize"
    assert client.post(path, headers=b).status_code == 403


def invoice_credit(client, b, a, session_factory) -> None:
    body = {"amount": 1, "reason": "goodwill"}
    path = f"/_billing/invoices/{a['invoice']}/credit-notes"
    assert client.post(path, json=body, headers=b).status_code == 403


def invoice_pay(client, b, a, session_factory) -> None:
    assert client.post(f"/_billing/invoices/{a['invoice']}/pay", headers=b).status_code == 403


def invoice_mark_uncollectible(client, b, a, session_factory) -> None:
    path = f"/_billing/invoices/{a['invoice']}/mark-uncollectible"
    assert client.post(path, headers=b).status_code == 403


def invoices_upcoming(client, b, a, session_factory) -> None:
    # B's own preview: none of A's usage (40 tokens this month) is in it.
    response = client.get("/_billing/invoices/upcoming?currency=usd", headers=b)
    assert response.status_code == 200
    assert (response.json()["lines"], response.json()["total_amount"]) == ([], 0)


def tenant_invoices_upcoming(client, b, a, session_factory) -> None:
    path = "/_billing/tenants/A/invoices/upcoming?currency=usd"
    assert client.get(path, headers=b).status_code == 403


def tenants_get(client, b, a, session_factory) -> None:
    assert client.get("/_billing/tenants", headers=b).status_code == 403
    assert client.get("/_billing/tenants/A", headers=b).status_code == 403


def tenant_put(client, b, a, session_factory) -> None:
    # The zone moves invoiced days: only operators set it, for B as for A.
    for tenant in ("A", "B"):
        body = {"timezone": "America/New_York"}
        assert client.put(f"/_billing/tenants/{tenant}", json=body, headers=b).status_code == 403


def quotas_get(client, b, a, session_factory) -> None:
    assert client.get("/_billing/quotas", headers=b).json()["items"] == []


CASES: dict[tuple[str, str], Case] = {
    ("POST", "/_billing/usage"): usage_post,
    ("POST", "/_billing/usage/batch"): usage_batch,
    ("GET", "/_billing/usage"): usage_get,
    ("GET", "/_billing/plans"): plans_get,
    ("POST", "/_billing/plans"): plans_post,
    ("POST", "/_billing/prices"): prices_post,
    ("GET", "/_billing/meters"): meters_get,
    ("POST", "/_billing/meters"): meters_post,
    ("GET", "/_billing/subscriptions"): subscriptions_get,
    ("POST", "/_billing/subscriptions"): subscriptions_post,
    ("POST", "/_billing/subscriptions/{subscription_id}/cancel"): subscription_cancel,
    ("GET", "/_billing/tenants/{tenant_id}/subscriptions"): tenant_subscriptions_get,
    ("GET", "/_billing/tenants/{tenant_id}/invoices"): tenant_invoices_get,
    ("GET", "/_billing/tenants/{tenant_id}/invoices/{invoice_id}"): tenant_invoice_get,
    ("GET", "/_billing/invoices/{invoice_id}/lines"): invoice_lines_get,
    ("GET", "/_billing/tenants/{tenant_id}/invoices/{invoice_id}/lines"): tenant_invoice_lines_get,
    ("GET", "/_billing/invoices"): invoices_get,
    ("GET", "/_billing/invoices/{invoice_id}"): invoice_get,
    ("POST", "/_billing/invoices/{invoice_id}/void"): invoice_void,
    ("POST", "/_billing/invoices/{invoice_id}/pay"): invoice_pay,
    ("POST", "/_billing/invoices/{invoice_id}/credit-notes"): invoice_credit,
    ("POST", "/_billing/invoices/{invoice_id}/finalize"): invoice_finalize,
    ("POST", "/_billing/invoices/{invoice_id}/mark-uncollectible"): invoice_mark_uncollectible,
    ("GET", "/_billing/invoices/upcoming"): invoices_upcoming,
    ("GET", "/_billing/tenants/{tenant_id}/invoices/upcoming"): tenant_invoices_upcoming,
    ("GET", "/_billing/tenants"): tenants_get,
    ("GET", "/_billing/tenants/{tenant_id}"): tenants_get,
    ("PUT", "/_billing/tenants/{tenant_id}"): tenant_put,
    ("GET", "/_billing/quotas"): quotas_get,
}


def test_the_matrix_covers_every_billing_route(app) -> None:
    routes = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/_billing")
        for method in operations
    }
    assert routes == set(CASES)


@pytest.mark.parametrize("route", sorted(CASES), ids=lambda r: f"{r[0]} {r[1]}")
def test_tenant_b_can_neither_read_nor_change_tenant_a_s_data(
    client, legacy_key, tenant_a, session_factory, route
) -> None:
    before = snapshot(session_factory)
    CASES[route](client, legacy_key("B"), tenant_a, session_factory)
    assert snapshot(session_factory) == before


def test_a_tenant_cannot_end_its_own_subscription_to_lift_its_quotas(
    client, legacy_key, tenant_a, session_factory
) -> None:
    a = legacy_key("A")
    before = snapshot(session_factory)
    path = f"/_billing/subscriptions/{tenant_a['subscription']}/cancel"
    response = client.post(path, headers=a)
    assert (response.status_code, response.json()["type"]) == (
        403,
        "urn:billing:problem:operator-only",
    )
    assert (
        client.post(
            "/_billing/subscriptions", json={"tenant_id": "A", "plan_key": "pro"}, headers=a
        ).status_code
        == 403
    )
    assert snapshot(session_factory) == before
    assert client.get("/_billing/quotas", headers=a).json()["items"][0]["limit"] == 50


def test_tenant_a_still_sees_its_own_data(client, make_key, tenant_a) -> None:
    a = make_key("A", READ_WRITE)
    assert client.get("/_billing/usage", headers=a).json()["items"][0]["total"] == 40
    assert len(client.get("/_billing/subscriptions", headers=a).json()["items"]) == 1
    invoice = client.get(f"/_billing/invoices/{tenant_a['invoice']}", headers=a).json()
    assert (invoice["total_amount"], invoice["lines"][0]["amount"]) == (1234, 1234)
    assert client.get("/_billing/quotas", headers=a).json()["items"][0]["used"] == 40


def test_quota_checks_count_only_the_caller_s_usage(client, make_key, operator, tenant_a) -> None:
    b = make_key("B", READ_WRITE)
    body = {"tenant_id": "B", "plan_key": "pro"}
    assert client.post("/_billing/subscriptions", json=body, headers=operator).status_code == 201
    response = client.post("/generate", headers=b)  # consumes 10 tokens of B's 50
    assert response.headers["ratelimit-remaining"] == "40"
    a = make_key("A", READ_WRITE)
    assert client.get("/_billing/quotas", headers=a).json()["items"][0]["used"] == 40
