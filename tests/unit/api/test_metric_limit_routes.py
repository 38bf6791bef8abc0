"""MAX_METRICS_PER_TENANT over HTTP: a 422 problem naming the limit, per event in a batch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from billing.api import add_billing, register_error_handlers
from billing.models import UsageEvent

from .conftest import NOW


@pytest.fixture
def limited(session_factory) -> Iterator[TestClient]:
    """The API with a limit of 2 metrics per tenant and month."""
    app = FastAPI()
    register_error_handlers(app)
    add_billing(app, session_factory=session_factory, clock=lambda: NOW, max_metrics_per_tenant=2)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def event(metric: str, key: str) -> dict:
    return {"metric": metric, "amount": 1, "idempotency_key": key, "at": NOW.isoformat()}


def metrics(session_factory) -> list[str]:
    with session_factory() as session:
        return list(
            session.execute(select(UsageEvent.metric).order_by(UsageEvent.metric)).scalars()
        )


def test_a_new_metric_past_the_limit_answers_422_too_many_metrics(
    limited, make_key, session_factory
) -> None:
    key = make_key("A")
    for metric in ("a", "b"):
        assert (
            limited.post("/_billing/usage", json=event(metric, metric), headers=key).status_code
            == 202
        )
    response = limited.post("/_billing/usage", json=event("c", "c"), headers=key)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:billing:problem:too-many-metrics"
    assert problem["limit"] == 2
    assert "MAX_METRICS_PER_TENANT is 2" in problem["detail"]
    assert metrics(session_factory) == ["a", "b"]
    again = limited.post("/_billing/usage", json=event("a", "a2"), headers=key)
    assert again.status_code == 202  # a metric the month has is still taken
    other = limited.post("/_billing/usage", json=event("c", "c"), headers=make_key("B"))
    assert other.status_code == 202  # another tenant has its own limit


def test_a_batch_refuses_only_the_events_of_new_metrics_past_the_limit(
    limited, make_key, session_factory
) -> None:
    key = make_key("A")
    batch = [event("a", "1"), event("b", "2"), event("c", "3"), event("a", "4"), event("d", "5")]
    response = limited.post("/_billing/usage/batch", json={"events": batch}, headers=key)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [
        "accepted",
        "accepted",
        "rejected",
        "accepted",
        "rejected",
    ]
    assert results[2]["error"]["status"] == 422
    assert results[2]["error"]["field"] == "metric"
    assert "MAX_METRICS_PER_TENANT is 2" in results[2]["error"]["detail"]
    assert metrics(session_factory) == ["a", "a", "b"]


def test_an_all_or_nothing_batch_past_the_limit_stores_nothing(
    limited, make_key, session_factory
) -> None:
    batch = [event("a", "1"), event("b", "2"), event("c", "3")]
    response = limited.post(
        "/_billing/usage/batch", json={"events": batch, "all_or_nothing": True}, headers=make_key()
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "events.2.metric"
    assert metrics(session_factory) == []


def test_max_metrics_per_tenant_is_a_setting(sqlite_engine, monkeypatch) -> None:
    from billing.api.keys import create_key
    from billing.app import create_app
    from billing.db import make_session_factory

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("MAX_METRICS_PER_TENANT", "1")
    with make_session_factory(sqlite_engine).begin() as session:
        _, plaintext = create_key(session, tenant_id="A", scopes=["billing.write"])
    headers = {"Authorization": f"Bearer {plaintext}"}
    with TestClient(create_app()) as client:
        first = client.post(
            "/_billing/usage", json={**event("a", "a"), "at": None}, headers=headers
        )
        second = client.post(
            "/_billing/usage", json={**event("b", "b"), "at": None}, headers=headers
        )
    assert (first.status_code, second.status_code) == (202, 422)
    assert second.json()["limit"] == 1
