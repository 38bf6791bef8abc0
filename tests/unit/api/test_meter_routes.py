"""POST/GET /_billing/meters: operators declare meters; bad declarations are problem+json."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from billing.models import Meter

PEAK = {"key": "seats", "aggregation": "max", "group_by": ["team"]}


def test_declaring_then_changing_a_meter(client, operator, a_key) -> None:
    created = client.post("/_billing/meters", json=PEAK, headers=operator)
    assert (created.status_code, created.json()) == (
        201,
        {"key": "seats", "aggregation": "max", "property": None, "group_by": ["team"]},
    )
    changed = client.post(
        "/_billing/meters",
        json={"key": "seats", "aggregation": "unique_count", "property": "user_id"},
        headers=operator,
    )
    assert changed.status_code == 200
    listed = client.get("/_billing/meters", headers=a_key).json()["items"]
    assert listed == [
        {"key": "seats", "aggregation": "unique_count", "property": "user_id", "group_by": []}
    ]


def test_a_tenant_key_cannot_declare(client, a_key, session_factory) -> None:
    response = client.post("/_billing/meters", json=PEAK, headers=a_key)
    assert response.status_code == 403
    with session_factory() as session:
        assert session.execute(select(Meter)).all() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key": "m", "aggregation": "unique_count"}, "property"),
        ({"key": "m", "group_by": ["a b"]}, "group_by[0]"),
        ({"key": "m", "aggregation": "avg"}, "aggregation"),
    ],
)
def test_a_malformed_meter_is_a_422_problem_and_stores_nothing(
    client, operator, session_factory, body, field
) -> None:
    response = client.post("/_billing/meters", json=body, headers=operator)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field
    with session_factory() as session:
        assert session.execute(select(Meter)).all() == []
