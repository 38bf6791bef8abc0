"""GET /_billing/usage?group_by=...: per-group daily totals of a metric under its meter."""

from __future__ import annotations

from datetime import timedelta

from billing import BillingService
from billing.meters import declare_meter

from .conftest import NOW

DAY = NOW.replace(hour=0)


def setup_usage(session_factory, tenant: str = "A") -> None:
    with session_factory.begin() as session:
        declare_meter(session, key="tokens", aggregation="max", group_by=["model"])
        bs = BillingService(session=session, tenant_id=tenant)
        for key, amount, model, day in [
            ("a", 10, "gpt-4", 0),
            ("b", 40, "gpt-4", 0),
            ("c", 7, "claude", 0),
            ("d", 3, "claude", 1),
        ]:
            bs.record_usage(
                metric="tokens",
                amount=amount,
                at=DAY + timedelta(days=day, hours=1),
                idempotency_key=key,
                metadata={"model": model},
            )
        for day in (0, 1):
            bs.aggregate_daily(metric="tokens", day_start=DAY + timedelta(days=day))


def test_group_by_returns_each_group_s_daily_value(client, a_key, session_factory) -> None:
    setup_usage(session_factory)
    setup_usage(session_factory, tenant="B")
    response = client.get(
        "/_billing/usage", params={"metric": "tokens", "group_by": "model"}, headers=a_key
    )
    assert response.status_code == 200
    items = [(i["period_start"][:10], i["group"], i["total"]) for i in response.json()["items"]]
    assert items == [
        ("2025-03-15", {"model": "claude"}, 7),
        ("2025-03-15", {"model": "gpt-4"}, 40),
        ("2025-03-16", {"model": "claude"}, 3),
    ]


def test_group_by_pages_through_every_group_once(client, a_key, session_factory) -> None:
    setup_usage(session_factory)
    seen, cursor = [], None
    while True:
        params = {"metric": "tokens", "group_by": "model", "limit": 1}
        page = client.get(
            "/_billing/usage",
            params={**params, **({"cursor": cursor} if cursor else {})},
            headers=a_key,
        ).json()
        seen += [(i["period_start"], i["group"]["model"]) for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 3


def test_without_group_by_the_items_have_no_group(client, a_key, session_factory) -> None:
    setup_usage(session_factory)
    items = client.get("/_billing/usage", params={"metric": "tokens"}, headers=a_key).json()
    assert all("group" not in item for item in items["items"])


def test_group_by_that_is_not_the_meter_s_is_a_422(client, a_key, session_factory) -> None:
    setup_usage(session_factory)
    for params, field in [
        ({"metric": "tokens", "group_by": "region"}, "group_by"),
        ({"group_by": "model"}, "metric"),
        ({"metric": "tokens", "group_by": "model", "granularity": "month"}, "granularity"),
    ]:
        response = client.get("/_billing/usage", params=params, headers=a_key)
        assert (response.status_code, response.json()["field"]) == (422, field)
        assert response.headers["content-type"] == "application/problem+json"
