"""PUT/GET /_billing/tenants: operators set a tenant's name and zone; problems for bad input."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from billing.models import Invoice, Tenant

NY = {"name": "Acme", "timezone": "America/New_York"}


def test_creating_changing_and_reading_a_tenant(client, operator) -> None:
    created = client.put("/_billing/tenants/t1", json=NY, headers=operator)
    assert created.status_code == 201
    body = created.json()
    assert (body["id"], body["name"], body["timezone"]) == ("t1", "Acme", "America/New_York")
    changed = client.put(
        "/_billing/tenants/t1", json={"timezone": "Asia/Kathmandu"}, headers=operator
    )
    assert (changed.status_code, changed.json()["name"]) == (200, "Acme")
    listed = client.get("/_billing/tenants", headers=operator).json()["items"]
    assert [(t["id"], t["timezone"]) for t in listed] == [("t1", "Asia/Kathmandu")]
    assert client.get("/_billing/tenants/t1", headers=operator).json()["timezone"] == (
        "Asia/Kathmandu"
    )


def test_a_tenant_without_a_row_reads_as_utc(client, operator) -> None:
    response = client.get("/_billing/tenants/other", headers=operator)
    assert response.json() == {
        "id": "other",
        "name": "other",
        "timezone": "UTC",
        "created_at": None,
    }


def test_an_unknown_zone_is_a_422_problem_naming_it_and_stores_nothing(
    client, operator, session_factory
) -> None:
    response = client.put(
        "/_billing/tenants/t1", json={"timezone": "Mars/Olympus"}, headers=operator
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("invalid-timezone")
    assert problem["field"] == "timezone"
    assert "Mars/Olympus" in problem["detail"]
    with session_factory() as session:
        assert session.execute(select(Tenant)).all() == []


def test_a_tenant_key_cannot_set_tenants(client, a_key, session_factory) -> None:
    assert client.put("/_billing/tenants/A", json=NY, headers=a_key).status_code == 403
    assert client.get("/_billing/tenants", headers=a_key).status_code == 403
    with session_factory() as session:
        assert session.execute(select(Tenant)).all() == []


def test_a_zone_change_after_an_invoice_is_a_409_problem(client, operator, session_factory) -> None:
    with session_factory.begin() as session:
        session.add(
            Invoice(
                tenant_id="t1",
                period_start=datetime(2025, 1, 1, tzinfo=UTC),
                period_end=datetime(2025, 2, 1, tzinfo=UTC),
                status="open",
                total_amount=0,
                currency="usd",
            )
        )
    response = client.put("/_billing/tenants/t1", json=NY, headers=operator)
    assert response.status_code == 409
    assert response.json()["type"].endswith("timezone-locked")
    with session_factory() as session:
        assert session.execute(select(Tenant)).all() == []
