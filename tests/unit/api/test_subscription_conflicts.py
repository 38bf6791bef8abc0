"""`POST /_billing/subscriptions` sent twice (no `Idempotency-Key`) or overlapping another
subscription: a 409 problem naming the existing subscription, nothing changed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from billing.models import Subscription

from .conftest import NOW

CONFLICT = "urn:billing:problem:subscription-conflict"


@pytest.fixture
def plans(client, operator) -> None:
    for key in ("pro", "team"):
        plan = {"key": key, "name": key.title(), "entitlements": []}
        assert client.post("/_billing/plans", json=plan, headers=operator).status_code == 201


def subscribe(client, operator, **body):
    return client.post("/_billing/subscriptions", json={"tenant_id": "A", **body}, headers=operator)


def stored(session_factory) -> list[tuple[str, object, object]]:
    with session_factory() as session:
        rows = session.execute(
            select(Subscription.id, Subscription.effective_at, Subscription.ended_at).order_by(
                Subscription.effective_at
            )
        )
        return [tuple(row) for row in rows]


def assert_conflict(response, existing_id: str) -> None:
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["type"], problem["existing_id"]) == (CONFLICT, existing_id)
    assert existing_id in problem["detail"]


@pytest.mark.parametrize("effective_at", [None, "2025-03-01T00:00:00Z"])
def test_the_same_body_twice_stores_one_subscription(
    client, operator, plans, clock, session_factory, effective_at
) -> None:
    body = (
        {"plan_key": "pro"}
        if effective_at is None
        else {"plan_key": "pro", "effective_at": effective_at}
    )
    first = subscribe(client, operator, **body)
    assert first.status_code == 201
    before = stored(session_factory)
    clock.now = NOW + timedelta(minutes=1)  # a retry a minute later, its own "now"
    assert_conflict(subscribe(client, operator, **body), first.json()["id"])
    assert stored(session_factory) == before
    assert before[0][2] is None  # the first one is still open


def test_changing_plans_still_ends_the_first_at_the_second_s_start(
    client, operator, plans, clock, session_factory
) -> None:
    first = subscribe(client, operator, plan_key="pro").json()["id"]
    clock.now = NOW + timedelta(days=1)
    assert subscribe(client, operator, plan_key="team").status_code == 201
    [(first_id, _, ended), (_, started, open_end)] = stored(session_factory)
    assert (first_id, ended, started, open_end) == (first, clock.now, clock.now, None)


def test_the_same_plan_again_after_it_ended_is_a_new_subscription(
    client, operator, plans, clock, session_factory
) -> None:
    body = {"plan_key": "pro", "ended_at": (NOW + timedelta(days=1)).isoformat()}
    assert subscribe(client, operator, **body).status_code == 201
    clock.now = NOW + timedelta(days=1)  # the instant it ends: not on the plan any more
    assert subscribe(client, operator, plan_key="pro").status_code == 201
    assert len(stored(session_factory)) == 2


def test_overlapping_a_later_subscription_names_it(
    client, operator, plans, session_factory
) -> None:
    later = subscribe(client, operator, plan_key="pro", effective_at="2025-04-01T00:00:00Z")
    response = subscribe(
        client,
        operator,
        plan_key="team",
        effective_at="2025-03-20T00:00:00Z",
        ended_at="2025-04-02T00:00:00Z",
    )
    assert_conflict(response, later.json()["id"])
    assert len(stored(session_factory)) == 1


def test_the_same_request_at_once_stores_one_subscription(
    client, operator, plans, session_factory, race
) -> None:
    """Six threads at once: PostgreSQL's race and SQLite's serialized writers alike."""
    codes = race(6, lambda _: subscribe(client, operator, plan_key="pro").status_code)
    assert sorted(codes) == [201] + [409] * 5
    assert len(stored(session_factory)) == 1
