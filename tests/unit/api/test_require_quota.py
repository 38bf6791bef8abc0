"""require_quota on the app's own routes: headers, hard 429, soft warning, consume, windows."""

from __future__ import annotations

from datetime import timedelta

import pytest

from billing.api import require_quota

from .conftest import NOW

LIMITS = [
    {"key": "reports", "limit_per_window": 2, "window": "day"},
    {"key": "exports", "limit_per_window": 3, "window": "month"},
    {"key": "tokens", "limit_per_window": 25, "window": "day"},
]


@pytest.fixture
def subscribed(client, operator) -> None:
    client.post(
        "/_billing/plans",
        json={"key": "pro", "name": "Pro", "entitlements": LIMITS},
        headers=operator,
    )
    client.post(
        "/_billing/subscriptions",
        json={
            "tenant_id": "A",
            "plan_key": "pro",
            "effective_at": (NOW - timedelta(days=1)).isoformat(),
        },
        headers=operator,
    )


def use(client, headers, metric, amount, at=NOW, key=None) -> None:
    body = {
        "metric": metric,
        "amount": amount,
        "at": at.isoformat(),
        "idempotency_key": key or f"{metric}-{amount}-{at.isoformat()}",
    }
    assert client.post("/_billing/usage", json=body, headers=headers).status_code == 202


def test_under_the_limit_the_route_runs_with_ratelimit_headers(client, a_key, subscribed) -> None:
    use(client, a_key, "reports", 1)
    response = client.get("/reports", headers=a_key)
    assert response.status_code == 200
    assert response.headers["ratelimit-limit"] == "2"
    assert response.headers["ratelimit-remaining"] == "1"
    assert response.headers["ratelimit-reset"] == str(12 * 3600)
    assert "warning" not in response.headers


def test_over_a_hard_limit_answers_429_with_retry_after(client, a_key, subscribed) -> None:
    use(client, a_key, "reports", 2)  # recorded a moment ago: counted at once
    response = client.get("/reports", headers=a_key)
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == str(12 * 3600)
    assert response.headers["ratelimit-remaining"] == "0"
    assert response.json()["type"] == "urn:billing:problem:quota-exceeded"
    assert (response.json()["limit"], response.json()["used"]) == (2, 2)


def test_a_new_day_resets_a_daily_quota(client, a_key, subscribed, clock) -> None:
    use(client, a_key, "reports", 2)
    clock.now = NOW + timedelta(hours=12)
    response = client.get("/reports", headers=a_key)
    assert (response.status_code, response.headers["ratelimit-remaining"]) == (200, "2")


def test_a_monthly_quota_counts_the_whole_month(client, a_key, subscribed, clock) -> None:
    use(client, a_key, "exports", 1, at=NOW - timedelta(days=10))
    use(client, a_key, "exports", 1, at=NOW - timedelta(days=20))  # February: not counted
    use(client, a_key, "exports", 1)
    response = client.get("/exports", headers=a_key)
    assert response.headers["ratelimit-remaining"] == "1"
    assert response.headers["ratelimit-reset"] == str(
        int((NOW.replace(month=4, day=1, hour=0) - NOW).total_seconds())
    )


def test_over_a_soft_limit_the_route_runs_with_a_warning(client, a_key, subscribed) -> None:
    use(client, a_key, "exports", 5)
    response = client.get("/exports", headers=a_key)
    assert response.status_code == 200
    assert response.headers["ratelimit-remaining"] == "0"
    assert "soft quota exceeded" in response.headers["warning"]


def test_without_a_subscription_nothing_is_limited(client, a_key) -> None:
    use(client, a_key, "reports", 1000)
    response = client.get("/reports", headers=a_key)
    assert response.status_code == 200
    assert "ratelimit-limit" not in response.headers


def test_consume_records_usage_and_stops_at_the_hard_limit(client, a_key, subscribed) -> None:
    statuses = [client.post("/generate", headers=a_key).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    usage = client.get("/_billing/usage", params={"metric": "tokens"}, headers=a_key).json()
    assert usage["items"][0]["total"] == 20
    quotas = {q["key"]: q for q in client.get("/_billing/quotas", headers=a_key).json()["items"]}
    assert (quotas["tokens"]["used"], quotas["tokens"]["remaining"]) == (20, 5)


def test_the_quota_needs_a_principal(client, subscribed) -> None:
    assert client.get("/reports").status_code == 401


@pytest.mark.parametrize(
    "kwargs", [{"window": "week"}, {"consume": -1}, {"consume": True}, {"key": ""}]
)
def test_a_malformed_quota_is_refused_when_declared(kwargs) -> None:
    arguments = {"key": "reports", **kwargs}
    with pytest.raises(ValueError, match="window|consume|key"):
        require_quota(arguments.pop("key"), **arguments)


def test_the_seed_s_import_path_works() -> None:
    from billing.quotas import require_quota as from_quotas

    assert from_quotas is require_quota
