"""LATE_USAGE over HTTP: `reject` answers 409 problem+json naming the closed period (per event
in a batch); `ignore` stores the event and `GET /usage` shows it. Settings read it once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select

from billing import BillingService
from billing.api import add_billing, register_error_handlers
from billing.api.settings import ApiSettings
from billing.models import UsageEvent
from billing.settings import BillingSettings
from tests.unit.billing.test_lifecycle import seed_plan

from .conftest import NOW

FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)
LATE = {"metric": "tokens", "amount": 3, "at": "2025-02-20T10:00:00Z", "idempotency_key": "late"}
ON_TIME = {**LATE, "at": "2025-03-01T00:00:00Z", "idempotency_key": "on-time"}


def client_with(session_factory, clock, late_usage: str) -> TestClient:
    app = FastAPI()
    register_error_handlers(app)
    add_billing(app, session_factory=session_factory, clock=clock, late_usage=late_usage)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def february_invoiced(session_factory) -> None:
    with session_factory.begin() as session:
        seed_plan(session, ["A"])
        BillingService(session=session, tenant_id="A", now=lambda: NOW).generate_monthly_invoice(
            period_start=FEB, period_end=MAR, currency="usd"
        )


def stored(session_factory) -> int:
    with session_factory() as session:
        return session.execute(select(func.count()).select_from(UsageEvent)).scalar_one()


def test_reject_answers_409_naming_the_closed_period_and_stores_nothing(
    session_factory, clock, a_key, february_invoiced
) -> None:
    with client_with(session_factory, clock, "reject") as client:
        response = client.post("/_billing/usage", json=LATE, headers=a_key)
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "urn:billing:problem:period-closed"
    assert (body["period_start"], body["period_end"]) == (FEB.isoformat(), MAR.isoformat())
    assert stored(session_factory) == 0


def test_reject_refuses_only_the_late_events_of_a_batch(
    session_factory, clock, a_key, february_invoiced
) -> None:
    with client_with(session_factory, clock, "reject") as client:
        response = client.post(
            "/_billing/usage/batch", json={"events": [ON_TIME, LATE]}, headers=a_key
        )
    assert response.status_code == 200
    accepted, rejected = response.json()["results"]
    assert accepted["status"] == "accepted"
    assert rejected["status"] == "rejected"
    assert (rejected["error"]["status"], rejected["error"]["field"]) == (409, "at")
    assert FEB.isoformat() in rejected["error"]["detail"]
    assert stored(session_factory) == 1


def test_ignore_stores_the_late_event_and_get_usage_shows_it(
    session_factory, clock, a_key, february_invoiced
) -> None:
    with client_with(session_factory, clock, "ignore") as client:
        assert client.post("/_billing/usage", json=LATE, headers=a_key).status_code == 202
        page = client.get("/_billing/usage", params={"granularity": "month"}, headers=a_key).json()
    assert [(i["period_start"][:7], i["total"]) for i in page["items"]] == [("2025-02", 3)]


def test_the_default_stores_late_usage(client, a_key, session_factory, february_invoiced) -> None:
    assert client.post("/_billing/usage", json=LATE, headers=a_key).status_code == 202
    assert stored(session_factory) == 1


def test_settings_read_the_policy_and_the_lookback(monkeypatch) -> None:
    monkeypatch.setenv("LATE_USAGE", "reject")
    monkeypatch.setenv("LATE_USAGE_LOOKBACK", "86400")
    policy = BillingSettings().invoice_policy()
    assert (policy.late_usage, policy.late_usage_lookback) == ("reject", timedelta(days=1))
    assert ApiSettings().late_usage == "reject"
    monkeypatch.setenv("LATE_USAGE_LOOKBACK", "P10D")
    assert BillingSettings().invoice_policy().late_usage_lookback == timedelta(days=10)


def test_the_defaults_are_next_invoice_and_35_days() -> None:
    policy = BillingSettings().invoice_policy()
    assert (policy.late_usage, policy.late_usage_lookback) == ("next_invoice", timedelta(days=35))


def test_an_unknown_policy_is_refused_at_startup(monkeypatch) -> None:
    monkeypatch.setenv("LATE_USAGE", "later")
    with pytest.raises(ValidationError):
        BillingSettings()
    with pytest.raises(ValidationError):
        ApiSettings()


def test_create_app_passes_the_policy_down(monkeypatch, session_factory) -> None:
    from billing.app import create_app

    app = create_app(ApiSettings(late_usage="ignore"), session_factory=session_factory)
    assert isinstance(app, FastAPI)
    assert app.state.billing_api.late_usage == "ignore"
