"""Operator keys (no tenant, `billing.admin`) manage the catalogue and any tenant's
subscriptions and invoices; they have no tenant routes; tenant keys never hold `billing.admin`."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi import FastAPI, Header
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from billing.api import Principal, add_billing, register_error_handlers
from billing.api.keys import create_key, hash_key
from billing.api.models import ApiKey
from billing.errors import InvalidUsageError
from billing.migrate import downgrade, upgrade
from billing.models import Invoice, Subscription
from workers.cli import main

from .conftest import NOW, READ_WRITE


@pytest.fixture
def plan(client, operator) -> None:
    plan = {"key": "pro", "name": "Pro", "entitlements": []}
    assert client.post("/_billing/plans", json=plan, headers=operator).status_code == 201


@pytest.fixture
def invoice_of_b(session_factory) -> str:
    with session_factory.begin() as session:
        invoice = Invoice(
            tenant_id="B",
            period_start=datetime(2025, 2, 1, tzinfo=UTC),
            period_end=datetime(2025, 3, 1, tzinfo=UTC),
            total_amount=500,
            currency="usd",
        )
        session.add(invoice)
        session.flush()
        return invoice.id


def test_one_operator_key_subscribes_and_cancels_any_tenant(
    client, operator, plan, session_factory
) -> None:
    for tenant in ("A", "B"):
        body = {"tenant_id": tenant, "plan_key": "pro"}
        created = client.post("/_billing/subscriptions", json=body, headers=operator)
        assert (created.status_code, created.json()["tenant_id"]) == (201, tenant)
    [b_sub] = client.get("/_billing/tenants/B/subscriptions", headers=operator).json()["items"]
    cancelled = client.post(f"/_billing/subscriptions/{b_sub['id']}/cancel", headers=operator)
    assert cancelled.json()["ended_at"] == NOW.isoformat().replace("+00:00", "Z")
    with session_factory() as session:
        ended = dict(session.execute(select(Subscription.tenant_id, Subscription.ended_at)).all())
    assert ended == {"A": None, "B": NOW}


def test_an_operator_reads_and_voids_any_tenant_s_invoices(
    client, operator, invoice_of_b, make_key
) -> None:
    page = client.get("/_billing/tenants/B/invoices", headers=operator).json()
    assert [i["id"] for i in page["items"]] == [invoice_of_b]
    assert client.get("/_billing/tenants/A/invoices", headers=operator).json()["items"] == []
    one = client.get(f"/_billing/tenants/B/invoices/{invoice_of_b}", headers=operator)
    assert one.json()["total_amount"] == 500
    elsewhere = client.get(f"/_billing/tenants/A/invoices/{invoice_of_b}", headers=operator)
    assert elsewhere.status_code == 404
    voided = client.post(f"/_billing/invoices/{invoice_of_b}/void", headers=operator)
    assert voided.json()["status"] == "void"
    b = make_key("B", READ_WRITE)
    assert client.get(f"/_billing/invoices/{invoice_of_b}", headers=b).json()["status"] == "void"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/_billing/usage", None),
        ("POST", "/_billing/usage", {"metric": "m", "amount": 1, "idempotency_key": "k"}),
        ("GET", "/_billing/subscriptions", None),
        ("GET", "/_billing/invoices", None),
        ("GET", "/_billing/quotas", None),
        ("GET", "/reports", None),
    ],
)
def test_an_operator_key_has_no_tenant_routes(client, operator, method, path, body) -> None:
    response = client.request(method, path, json=body, headers=operator)
    assert (response.status_code, response.json()["type"]) == (
        403,
        "urn:billing:problem:operator-key",
    )


def test_operators_read_the_catalogue(client, operator, plan) -> None:
    assert [p["key"] for p in client.get("/_billing/plans", headers=operator).json()["items"]] == [
        "pro"
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tenant_id": "A", "scopes": ["billing.admin"]},
        {"tenant_id": "A", "scopes": ["billing.read", "billing.admin"]},
        {"operator": True, "scopes": ["billing.read"]},
        {"operator": True, "scopes": []},
        {"operator": True, "tenant_id": "A", "scopes": ["billing.admin"]},
        {"scopes": ["billing.admin"]},
    ],
)
def test_no_key_is_both_a_tenant_s_and_an_operator_s(session, kwargs) -> None:
    with pytest.raises(InvalidUsageError):
        create_key(session, **kwargs)
    assert session.execute(select(ApiKey)).first() is None


def test_a_plugged_in_principal_acting_for_a_tenant_is_never_an_operator(
    session_factory,
) -> None:
    def from_gateway(x_tenant: str | None = Header(None)) -> Principal:
        return Principal(tenant_id=x_tenant, scopes=frozenset({"billing.admin"}))

    app = FastAPI()
    register_error_handlers(app)
    add_billing(app, session_factory=session_factory, principal=from_gateway)
    plan = {"key": "p", "name": "P"}
    with TestClient(app) as client:
        assert (
            client.post("/_billing/plans", json=plan, headers={"X-Tenant": "A"}).status_code == 403
        )
        assert client.post("/_billing/plans", json=plan).status_code == 201


def test_the_cli_creates_operator_keys_and_refuses_admin_tenant_keys(
    sqlite_engine, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    assert main(["keys", "create", "--operator", "--scope", "billing.admin"]) == 0
    assert capsys.readouterr().out.startswith("bk_")
    assert main(["keys", "create", "--tenant", "A", "--scope", "billing.admin"]) == 2
    assert "billing.admin" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "create", "--tenant", "A", "--operator", "--scope", "billing.admin"])
    with sqlite_engine.connect() as conn:
        assert conn.execute(select(ApiKey.tenant_id, ApiKey.scopes)).all() == [
            (None, ["billing.admin"])
        ]
    assert main(["keys", "list"]) == 0
    assert "(operator)" in capsys.readouterr().out


def test_the_migration_takes_billing_admin_from_tenant_keys(engine) -> None:
    downgrade(engine, "0006_status_indexes")
    rows = {
        "both": ["billing.admin", "billing.read"],
        "admin-only": ["billing.admin"],
        "reader": ["billing.read"],
    }
    with engine.begin() as conn:
        conn.execute(
            insert(ApiKey),
            [
                {
                    "id": name,
                    "tenant_id": "A",
                    "prefix": "bk_x",
                    "key_hash": hash_key(name),
                    "scopes": scopes,
                    "created_at": NOW,
                }
                for name, scopes in rows.items()
            ],
        )
    upgrade(engine)
    with engine.connect() as conn:
        after = {
            key_id: (scopes, revoked is not None)
            for key_id, scopes, revoked in conn.execute(
                select(ApiKey.id, ApiKey.scopes, ApiKey.revoked_at)
            )
        }
    assert after == {
        "both": (["billing.read"], False),
        "admin-only": ([], True),
        "reader": (["billing.read"], False),
    }
