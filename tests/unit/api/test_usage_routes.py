"""POST /usage, POST /usage/batch and GET /usage through the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from sqlalchemy import event, select

from billing.api import add_billing
from billing.models import UsageEvent

from .conftest import NOW, Clock

EVENT = {"metric": "tokens", "amount": 42, "idempotency_key": "req-42"}


def events(session_factory) -> list[UsageEvent]:
    with session_factory() as session:
        return list(session.execute(select(UsageEvent).order_by(UsageEvent.created_at)).scalars())


def test_posting_an_event_stores_it_and_answers_202_with_its_id(
    client, a_key, session_factory
) -> None:
    sent = {**EVENT, "at": "2025-03-01T10:00:00+02:00", "metadata": {"model": "gpt"}}
    response = client.post("/_billing/usage", json=sent, headers=a_key)
    assert response.status_code == 202
    [stored] = events(session_factory)
    assert response.json() == {"id": stored.id, "duplicate": False}
    assert (stored.tenant_id, stored.metric, stored.amount) == ("A", "tokens", 42)
    assert stored.at_ts == datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
    assert stored.metadata_json == {"model": "gpt"}


def test_at_defaults_to_the_time_of_the_request(client, a_key, session_factory) -> None:
    client.post("/_billing/usage", json=EVENT, headers=a_key)
    assert events(session_factory)[0].at_ts == NOW


def test_the_same_event_again_answers_200_duplicate_with_the_first_id(
    client, a_key, session_factory
) -> None:
    first = client.post("/_billing/usage", json={**EVENT, "at": NOW.isoformat()}, headers=a_key)
    again = client.post("/_billing/usage", json={**EVENT, "at": NOW.isoformat()}, headers=a_key)
    assert again.status_code == 200
    assert again.json() == {"id": first.json()["id"], "duplicate": True}
    assert len(events(session_factory)) == 1


def test_a_retry_without_at_is_a_duplicate_even_later(
    client, a_key, clock, session_factory
) -> None:
    first = client.post("/_billing/usage", json=EVENT, headers=a_key)
    clock.now += timedelta(minutes=5)
    again = client.post("/_billing/usage", json=EVENT, headers=a_key)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    assert len(events(session_factory)) == 1


@pytest.mark.parametrize(
    "change", [{"amount": 43}, {"at": (NOW + timedelta(seconds=1)).isoformat()}]
)
def test_the_same_key_with_another_amount_or_time_answers_409(
    client, a_key, session_factory, change
) -> None:
    first = client.post("/_billing/usage", json={**EVENT, "at": NOW.isoformat()}, headers=a_key)
    response = client.post(
        "/_billing/usage", json={**EVENT, "at": NOW.isoformat(), **change}, headers=a_key
    )
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["existing_id"] == first.json()["id"]
    assert len(events(session_factory)) == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"at": "2025-03-01T10:00:00"}, "at"),
        ({"at": "yesterday"}, "at"),
        ({"at": "0001-01-01T00:00:00+05:00"}, "at"),
        ({"amount": -1}, "amount"),
        ({"amount": "42"}, "amount"),
        ({"amount": 4.5}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": 2**63}, "amount"),
        ({"metric": ""}, "metric"),
        ({"metric": "   "}, "metric"),
        ({"metric": "x" * 101}, "metric"),
        ({"metric": "to\x00kens"}, "metric"),
        ({"metric": "tokens\n2025-01-01 acme 0"}, "metric"),
        ({"metric": "tokens\x1b[31m"}, "metric"),
        ({"metric": "\u202etokens"}, "metric"),
        ({"metric": "api calls"}, "metric"),
        ({"metric": "tokens\n"}, "metric"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"idempotency_key": None}, "idempotency_key"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"metadata": {"big": "x" * 17_000}}, "metadata"),
        ({"tenant_id": "B"}, "tenant_id"),
    ],
)
def test_bad_input_answers_422_naming_the_field_and_stores_nothing(
    client, a_key, session_factory, change, field
) -> None:
    response = client.post("/_billing/usage", json={**EVENT, **change}, headers=a_key)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 422
    assert body["field"] == field
    assert events(session_factory) == []


@pytest.mark.parametrize("metric", ["gpt-4:input/tokens", "m" * 100])
def test_a_metric_of_the_charset_up_to_100_characters_is_accepted(
    client, a_key, session_factory, metric
) -> None:
    response = client.post("/_billing/usage", json={**EVENT, "metric": metric}, headers=a_key)
    assert response.status_code == 202
    assert [e.metric for e in events(session_factory)] == [metric]


def test_a_batch_event_with_a_metric_outside_the_charset_is_rejected_alone(
    client, a_key, session_factory
) -> None:
    batch = [
        {"metric": "tokens", "amount": 1, "idempotency_key": "b1"},
        {"metric": "tok\u202eens", "amount": 1, "idempotency_key": "b2"},
    ]
    response = client.post("/_billing/usage/batch", json={"events": batch}, headers=a_key)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == ["accepted", "rejected"]
    assert results[1]["error"]["field"] == "metric"
    assert [e.idempotency_key for e in events(session_factory)] == ["b1"]


@pytest.mark.parametrize(
    ("at", "status"),
    [
        (NOW + timedelta(minutes=5), 202),
        (NOW + timedelta(minutes=5, microseconds=1), 422),
        (NOW + timedelta(days=400), 422),
        (NOW - timedelta(days=35), 202),
        (NOW - timedelta(days=35, microseconds=1), 422),
        (datetime(2000, 1, 1, tzinfo=UTC), 422),
    ],
)
def test_usage_more_than_5_minutes_ahead_or_older_than_35_days_answers_422(
    client, a_key, session_factory, at, status
) -> None:
    response = client.post("/_billing/usage", json={**EVENT, "at": at.isoformat()}, headers=a_key)
    assert response.status_code == status
    if status == 422:
        assert response.json()["field"] == "at"
        assert events(session_factory) == []
    batch = {"events": [{**EVENT, "idempotency_key": "b1", "at": at.isoformat()}]}
    response = client.post("/_billing/usage/batch", json=batch, headers=a_key)
    if status == 202:
        assert [r["status"] for r in response.json()["results"]] == ["accepted"]
    else:  # a batch whose every event is rejected answers 422
        assert (response.status_code, response.json()["field"]) == (422, "events.0")
        assert events(session_factory) == []


def test_usage_max_age_is_a_setting(sqlite_engine, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    from billing.api.keys import create_key
    from billing.app import create_app
    from billing.db import make_session_factory

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("USAGE_MAX_AGE", "P400D")
    with make_session_factory(sqlite_engine).begin() as session:
        _, plaintext = create_key(session, tenant_id="A", scopes=["billing.write"])
    old = (datetime.now(UTC) - timedelta(days=399)).isoformat()
    with TestClient(create_app()) as client:
        response = client.post(
            "/_billing/usage",
            json={**EVENT, "at": old},
            headers={"Authorization": f"Bearer {plaintext}"},
        )
    assert response.status_code == 202


def test_a_missing_field_is_named(client, a_key) -> None:
    response = client.post("/_billing/usage", json={"metric": "tokens"}, headers=a_key)
    assert response.status_code == 422
    assert {e["field"] for e in response.json()["errors"]} == {"amount", "idempotency_key"}


# --- batch ---------------------------------------------------------------------------------


def test_a_batch_answers_a_result_per_event_in_order(client, a_key, session_factory) -> None:
    at = NOW.isoformat()
    client.post("/_billing/usage", json={**EVENT, "at": at}, headers=a_key)
    batch = [
        {"metric": "tokens", "amount": 1, "idempotency_key": "b1", "at": at},
        {"metric": "tokens", "amount": -5, "idempotency_key": "b2"},
        {**EVENT, "at": at},
        {**EVENT, "amount": 7, "at": at},
        {"metric": "tokens", "amount": 1, "idempotency_key": "b1", "at": at},
        "not an object",
        {"metric": "calls", "amount": 3, "idempotency_key": "b3"},
    ]
    response = client.post("/_billing/usage/batch", json={"events": batch}, headers=a_key)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [
        "accepted",
        "rejected",
        "duplicate",
        "rejected",
        "duplicate",
        "rejected",
        "accepted",
    ]
    assert results[1]["error"]["field"] == "amount"
    assert results[3]["error"]["status"] == 409
    assert results[4]["id"] == results[0]["id"]
    stored = {(e.idempotency_key, e.amount) for e in events(session_factory)}
    assert stored == {("req-42", 42), ("b1", 1), ("b3", 3)}


def test_an_all_or_nothing_batch_with_a_bad_event_stores_nothing(
    client, a_key, session_factory
) -> None:
    batch = [
        {"metric": "tokens", "amount": 1, "idempotency_key": "b1"},
        {"metric": "tokens", "amount": 1, "idempotency_key": "b2", "at": "2025-01-01T00:00:00"},
    ]
    response = client.post(
        "/_billing/usage/batch", json={"events": batch, "all_or_nothing": True}, headers=a_key
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "events.1.at"
    assert events(session_factory) == []


def test_an_all_or_nothing_batch_of_good_events_stores_them_all(
    client, a_key, session_factory
) -> None:
    batch = [{"metric": "tokens", "amount": i, "idempotency_key": f"b{i}"} for i in range(5)]
    response = client.post(
        "/_billing/usage/batch", json={"events": batch, "all_or_nothing": True}, headers=a_key
    )
    assert [r["status"] for r in response.json()["results"]] == ["accepted"] * 5
    assert len(events(session_factory)) == 5


@pytest.mark.parametrize("size", [0, 1001])
def test_a_batch_holds_1_to_1000_events(client, a_key, size) -> None:
    batch = [{"metric": "m", "amount": 1, "idempotency_key": f"k{i}"} for i in range(size)]
    response = client.post("/_billing/usage/batch", json={"events": batch}, headers=a_key)
    assert response.status_code == 422
    assert response.json()["field"] == "events"


def test_a_batch_of_1000_is_stored(client, a_key, session_factory) -> None:
    batch = [{"metric": "m", "amount": 1, "idempotency_key": f"k{i}"} for i in range(1000)]
    response = client.post("/_billing/usage/batch", json={"events": batch}, headers=a_key)
    assert response.status_code == 200
    assert len(events(session_factory)) == 1000


# --- reading totals ------------------------------------------------------------------------


def post(client, headers, metric, amount, at, key=None):
    body = {
        "metric": metric,
        "amount": amount,
        "at": at.isoformat(),
        "idempotency_key": key or f"{metric}-{amount}-{at.isoformat()}",
    }
    assert client.post("/_billing/usage", json=body, headers=headers).status_code == 202


def test_usage_totals_include_what_was_recorded_a_moment_ago(client, a_key, clock) -> None:
    clock.now = NOW + timedelta(days=1)
    post(client, a_key, "tokens", 5, NOW)
    post(client, a_key, "tokens", 6, NOW + timedelta(hours=1))
    post(client, a_key, "tokens", 1, NOW + timedelta(days=1))
    post(client, a_key, "calls", 2, NOW)
    response = client.get("/_billing/usage", params={"metric": "tokens"}, headers=a_key)
    assert response.json() == {
        "items": [
            {
                "period_start": "2025-03-15T00:00:00Z",
                "granularity": "day",
                "metric": "tokens",
                "total": 11,
            },
            {
                "period_start": "2025-03-16T00:00:00Z",
                "granularity": "day",
                "metric": "tokens",
                "total": 1,
            },
        ],
        "next_cursor": None,
    }
    month = client.get("/_billing/usage", params={"granularity": "month"}, headers=a_key).json()
    assert [(i["metric"], i["total"]) for i in month["items"]] == [("calls", 2), ("tokens", 12)]


def test_usage_totals_between_from_and_to(client, a_key, clock) -> None:
    clock.now = NOW + timedelta(days=5)
    for day in range(5):
        post(client, a_key, "tokens", day + 1, NOW + timedelta(days=day))
    response = client.get(
        "/_billing/usage",
        params={"from": "2025-03-16T00:00:00Z", "to": "2025-03-18T00:00:00+00:00"},
        headers=a_key,
    )
    assert [i["total"] for i in response.json()["items"]] == [2, 3]


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    days=st.lists(
        st.tuples(st.integers(0, 35), st.sampled_from(["a", "b", "c"])), min_size=1, max_size=25
    ),
    limit=st.integers(1, 7),
)
def test_walking_the_cursor_returns_every_period_once_in_order(
    client, make_key, days, limit
) -> None:
    headers = make_key(f"walker-{len(days)}-{limit}-{hash(tuple(days))}")
    for day, metric in set(days):
        post(client, headers, metric, 1, NOW - timedelta(days=day))
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = client.get("/_billing/usage", params=params, headers=headers).json()
        seen += [(i["period_start"], i["metric"]) for i in page["items"]]
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None:
            break
        assert pages < 100
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) == len(set(days))


@pytest.mark.parametrize("cursor", ["garbage", "W10", "WyJ4IiwgMV0", "=" * 2000])
def test_a_cursor_the_api_did_not_make_answers_422(client, a_key, cursor) -> None:
    response = client.get("/_billing/usage", params={"cursor": cursor}, headers=a_key)
    assert response.status_code == 422
    assert response.json()["field"] == "cursor"


def ingest_counts() -> dict[str, float]:
    return {
        outcome: REGISTRY.get_sample_value("billing_usage_ingest_total", {"outcome": outcome})
        or 0.0
        for outcome in ("stored", "duplicate", "rejected")
    }


def test_a_new_event_without_at_is_stored_without_looking_for_its_key_first(
    client, a_key, engine, session_factory
) -> None:
    """The usual case costs no read of the stored events: the insert itself finds a key taken."""
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        response = client.post("/_billing/usage", json=EVENT, headers=a_key)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert response.status_code == 202
    assert len(events(session_factory)) == 1
    reads_of_stored_events = [
        s for s in statements if s.lstrip().upper().startswith("SELECT") and "idempotency_key" in s
    ]
    assert reads_of_stored_events == []


def test_a_retry_without_at_counts_one_duplicate_and_no_refusal(client, a_key, clock) -> None:
    client.post("/_billing/usage", json=EVENT, headers=a_key)
    clock.now += timedelta(minutes=5)  # the first try, at the new time, finds the key taken
    before = ingest_counts()
    again = client.post("/_billing/usage", json=EVENT, headers=a_key)
    assert again.status_code == 200
    after = ingest_counts()
    assert {k: after[k] - before[k] for k in after} == {
        "stored": 0.0,
        "duplicate": 1.0,
        "rejected": 0.0,
    }


def test_a_retry_without_at_in_a_month_at_its_metric_limit_is_still_a_duplicate(
    session_factory, make_key
) -> None:
    """Sent on March 31st, retried on April 1st when April already has its one metric: the
    retry is the March event (a duplicate), not a new April metric past the limit."""
    clock = Clock(datetime(2025, 3, 31, 23, 59, tzinfo=UTC))
    app = FastAPI()
    add_billing(app, session_factory=session_factory, clock=clock, max_metrics_per_tenant=1)
    key = make_key("A")
    with TestClient(app, raise_server_exceptions=False) as client:
        first = client.post("/_billing/usage", json=EVENT, headers=key)
        clock.now = datetime(2025, 4, 1, 0, 1, tzinfo=UTC)
        other = {"metric": "calls", "amount": 1, "idempotency_key": "c-1"}
        assert client.post("/_billing/usage", json=other, headers=key).status_code == 202
        again = client.post("/_billing/usage", json=EVENT, headers=key)
    assert first.status_code == 202
    assert again.status_code == 200, again.json()
    assert again.json() == {"id": first.json()["id"], "duplicate": True}
    [march] = [e for e in events(session_factory) if e.metric == "tokens"]
    assert march.at_ts == datetime(2025, 3, 31, 23, 59, tzinfo=UTC)
