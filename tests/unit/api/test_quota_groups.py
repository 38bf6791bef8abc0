"""Quotas that name a group: the entitlement limits that group's usage alone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from billing import BillingService, InvalidUsageError
from billing.api import add_billing, register_error_handlers, require_quota
from billing.meters import MAX_GROUP_BY
from billing.models import UsageEvent
from billing.quotas import check_quota, consume_quota, used_in_window

from .test_quota_counters import NOW, subscribe

GPT4 = {"model": "gpt-4"}


def use(session, key: str, amount: int, model: str | None, at=NOW) -> None:
    BillingService(session=session, tenant_id="A").record_usage(
        metric="tokens",
        amount=amount,
        at=at,
        idempotency_key=key,
        metadata={"model": model} if model else None,
    )


def test_a_group_quota_counts_only_that_group_s_window(session) -> None:
    subscribe(session)  # tokens: 100 a day
    use(session, "gpt", 60, "gpt-4")
    use(session, "claude", 30, "claude")
    use(session, "none", 5, None)
    use(session, "yesterday", 90, "gpt-4", at=NOW - timedelta(days=1))
    status = check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW, group=GPT4)
    assert status is not None
    assert (status.used, status.remaining, status.allowed) == (60, 40, True)
    whole = check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW)
    assert whole is not None
    assert whole.used == 95


def test_consuming_a_group_records_it_and_stops_at_its_limit(session) -> None:
    subscribe(session)
    use(session, "claude", 90, "claude")  # another group's usage does not count
    first = consume_quota(
        session, tenant_id="A", key="tokens", window="day", amount=70, now=NOW, group=GPT4
    )
    second = consume_quota(
        session, tenant_id="A", key="tokens", window="day", amount=40, now=NOW, group=GPT4
    )
    assert first is not None
    assert (first.used, first.allowed) == (70, True)
    assert second is not None
    assert (second.used, second.allowed) == (70, False)
    after = check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW, group=GPT4)
    assert after is not None
    assert after.used == 70


@pytest.mark.parametrize(
    "group",
    [
        {},
        {"model": 4},
        {"bad key": "x"},
        ["model"],
        {f"p{i}": "x" for i in range(MAX_GROUP_BY + 1)},
    ],
)
def test_a_malformed_group_is_refused(session, group) -> None:
    with pytest.raises(InvalidUsageError) as raised:
        check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW, group=group)
    assert raised.value.field == "group"
    with pytest.raises(ValueError, match="group"):
        require_quota("tokens", group=group)


def test_a_group_counts_its_tenant_s_metric_in_the_window_only(session) -> None:
    subscribe(session)
    day_start = NOW.replace(hour=0)
    use(session, "at-start", 1, "gpt-4", at=day_start)
    use(session, "at-end", 10, "gpt-4", at=day_start + timedelta(days=1))
    BillingService(session=session, tenant_id="B").record_usage(
        metric="tokens", amount=100, at=NOW, idempotency_key="b", metadata=GPT4
    )
    BillingService(session=session, tenant_id="A").record_usage(
        metric="calls", amount=1000, at=NOW, idempotency_key="c", metadata=GPT4
    )
    status = check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW, group=GPT4)
    assert status is not None
    assert status.used == 1


def test_used_in_window_with_a_group_counts_that_group_s_usage_alone(session) -> None:
    use(session, "gpt", 60, "gpt-4")
    use(session, "claude", 30, "claude")
    used = used_in_window(
        session, tenant_id="A", metric="tokens", window="day", now=NOW, group=GPT4
    )
    assert used == 60


def test_a_group_of_true_counts_the_events_whose_value_is_the_boolean_true(session) -> None:
    for key, premium in [("bool", True), ("text", "true"), ("one", 1), ("false", False)]:
        BillingService(session=session, tenant_id="A").record_usage(
            metric="tokens", amount=1, at=NOW, idempotency_key=key, metadata={"premium": premium}
        )
    used = used_in_window(
        session, tenant_id="A", metric="tokens", window="day", now=NOW, group={"premium": "true"}
    )
    assert used == 2


@pytest.mark.parametrize("limited", [True, False])
def test_consuming_a_group_stores_the_event_with_the_group_as_its_metadata(
    session, limited
) -> None:
    if limited:
        subscribe(session)
    consume_quota(session, tenant_id="A", key="tokens", window="day", amount=5, now=NOW, group=GPT4)
    assert session.execute(select(UsageEvent.metadata_json)).scalars().all() == [GPT4]


def test_a_group_of_as_many_properties_as_a_meter_groups_by_is_taken(session) -> None:
    subscribe(session)
    group = {f"p{i}": "x" for i in range(MAX_GROUP_BY)}
    status = check_quota(session, tenant_id="A", key="tokens", window="day", now=NOW, group=group)
    assert status is not None
    assert (status.used, status.allowed) == (0, True)


def test_require_quota_with_a_group_answers_429_once_the_group_is_used_up(
    session_factory, make_key
) -> None:
    with session_factory.begin() as session:
        subscribe(session)
    app = FastAPI()
    register_error_handlers(app)
    add_billing(app, session_factory=session_factory, clock=lambda: NOW)

    @app.post("/gpt4", dependencies=[Depends(require_quota("tokens", consume=60, group=GPT4))])
    def gpt4() -> dict:
        return {"ok": True}

    key = make_key("A")
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/gpt4", headers=key).status_code == 200
        refused = client.post("/gpt4", headers=key)
    assert refused.status_code == 429
    assert refused.json()["used"] == 60
