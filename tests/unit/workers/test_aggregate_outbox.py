"""`billing.aggregate_daily` writes its event and deliveries as `publish` does, on PostgreSQL in
the upsert's own statement: the same id and JSON, one delivery per matching subscription, once
however often and however concurrently it runs, a zone changed while it waited respected."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, Text, cast, literal, select
from sqlalchemy.orm import Session, sessionmaker

import webhooks
from billing import BillingService
from billing.aggregated_event import (
    aggregate_event_id,
    aggregated_payload,
    event_params,
    event_row,
)
from billing.db import make_session_factory
from billing.models import UsageAggregate
from billing.tenants import set_tenant
from webhooks.models import WebhookDelivery, WebhookEvent
from webhooks.subscriptions import SqlWebhookSubscriptions
from workers.jobs import USAGE_AGGREGATED, aggregate_daily_job

JAN = datetime(2025, 1, 1, tzinfo=UTC)
PAYLOAD = {"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01T00:00:00+00:00"}


def subscribe(factory: sessionmaker[Session]) -> dict[str, str]:
    """Subscriptions that match t1's event and some that must not; their ids by role."""
    with factory.begin() as session:
        subs = SqlWebhookSubscriptions(session)
        ids = {
            "any tenant": subs.add(USAGE_AGGREGATED, "https://a.example/hook").id,
            "t1": subs.add(USAGE_AGGREGATED, "https://b.example/hook", tenant_id="t1").id,
            "t2": subs.add(USAGE_AGGREGATED, "https://c.example/hook", tenant_id="t2").id,
            "disabled": subs.add(USAGE_AGGREGATED, "https://d.example/hook").id,
            "other topic": subs.add("billing.invoice.created", "https://e.example/hook").id,
        }
        subs.disable(ids["disabled"])
    return ids


def deliveries(factory: sessionmaker[Session]) -> list[tuple[str, str, str, int]]:
    with factory() as session:
        rows = session.execute(
            select(
                WebhookDelivery.event_id,
                WebhookDelivery.subscription_id,
                WebhookDelivery.status,
                WebhookDelivery.attempts,
            )
        ).all()
    return sorted((row[0], row[1], row[2], row[3]) for row in rows)


def test_the_event_is_delivered_to_each_matching_subscription_once(
    session_factory, seeded, outbox
) -> None:
    ids = subscribe(session_factory)
    seeded([("t1", 5, JAN + timedelta(hours=1))])
    assert aggregate_daily_job(session_factory, PAYLOAD) == 5
    assert aggregate_daily_job(session_factory, PAYLOAD) == 5  # the same total: nothing new
    [first] = outbox(USAGE_AGGREGATED)
    assert first == {"id": aggregate_event_id(first), **PAYLOAD, "total": 5}
    expected = sorted((first["id"], ids[role], "pending", 0) for role in ("any tenant", "t1"))
    assert deliveries(session_factory) == expected

    seeded([("t1", 2, JAN + timedelta(hours=2))])  # late usage: a new total, a new event
    assert aggregate_daily_job(session_factory, PAYLOAD) == 7
    [_, second] = outbox(USAGE_AGGREGATED)
    assert second == {"id": aggregate_event_id(second), **PAYLOAD, "total": 7}
    assert len(deliveries(session_factory)) == 4
    with session_factory() as session:
        stamps = session.execute(
            select(WebhookEvent.created_at, WebhookDelivery.next_attempt_at)
            .join(WebhookDelivery, WebhookDelivery.event_id == WebhookEvent.id)
            .where(WebhookEvent.id == second["id"])
        ).all()
    assert [due == created for created, due in stamps] == [True, True]


def test_the_next_job_sees_a_subscription_added_or_disabled_after_the_last(
    session_factory, seeded, outbox
) -> None:
    """Nothing about subscriptions is kept between jobs: each statement reads them."""
    seeded([("t1", 5, JAN)])
    aggregate_daily_job(session_factory, PAYLOAD)
    ids = subscribe(session_factory)
    seeded([("t1", 1, JAN + timedelta(hours=1))])
    aggregate_daily_job(session_factory, PAYLOAD)
    with session_factory.begin() as session:
        SqlWebhookSubscriptions(session).disable(ids["t1"])
    seeded([("t1", 1, JAN + timedelta(hours=2))])
    aggregate_daily_job(session_factory, PAYLOAD)
    first, second, third = (event["id"] for event in outbox(USAGE_AGGREGATED))
    assert deliveries(session_factory) == sorted(
        [
            (second, ids["any tenant"], "pending", 0),
            (second, ids["t1"], "pending", 0),
            (third, ids["any tenant"], "pending", 0),
        ]
    )
    assert first not in {row[0] for row in deliveries(session_factory)}


def test_another_tenants_event_goes_to_the_subscriptions_without_a_tenant_only(
    session_factory, seeded, outbox
) -> None:
    subscribe(session_factory)
    seeded([("t3", 4, JAN)])
    aggregate_daily_job(session_factory, {**PAYLOAD, "tenant_id": "t3"})
    [event] = outbox(USAGE_AGGREGATED)
    assert event["tenant_id"] == "t3"
    assert [row[0] for row in deliveries(session_factory)] == [event["id"]]  # "any tenant" only


def test_the_service_without_announce_publishes_nothing(session_factory, seeded, outbox) -> None:
    subscribe(session_factory)
    seeded([("t1", 5, JAN)])
    with session_factory.begin() as session:
        total = BillingService(session=session, tenant_id="t1").aggregate_daily(
            metric="tokens", day_start=JAN
        )
    assert total == 5
    assert outbox(USAGE_AGGREGATED) == []
    assert deliveries(session_factory) == []


@pytest.mark.postgres
def test_the_job_notifies_the_relays_at_commit(pg_engine: Engine, seeded, outbox_listener) -> None:
    factory = make_session_factory(pg_engine)
    subscribe(factory)
    aggregate_daily_job(factory, PAYLOAD)
    received = list(outbox_listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in received] == [webhooks.outbox.NOTIFY_CHANNEL]


TEXT = st.characters(blacklist_characters="\x00")


@pytest.mark.postgres
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    tenant=st.text(TEXT, min_size=1, max_size=64),
    metric=st.text(TEXT, min_size=1, max_size=100),
    offset=st.integers(min_value=-14 * 60, max_value=14 * 60),
    total=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_the_sql_event_row_is_what_publish_stores(
    pg_engine: Engine, tenant: str, metric: str, offset: int, total: int
) -> None:
    """The same id and JSON text as `publish(..., event_id=aggregate_event_id(...))` stores,
    for any tenant and metric text (quotes, backslashes, non-ASCII) and any 64-bit total."""
    day_start = JAN.astimezone(timezone(timedelta(minutes=offset))).isoformat()
    row = event_row(literal(total)).subquery()
    event_id, topic, tenant_id, payload, created_at = row.c
    query = select(event_id, topic, tenant_id, cast(payload, Text), created_at)
    params: dict[str, Any] = {**event_params(tenant, metric, day_start), "now": JAN}
    expected = aggregated_payload(tenant, metric, day_start, total)
    with pg_engine.connect() as conn:
        computed = conn.execute(query, params).one()
        with Session(bind=conn) as session:  # what `publish` stores, rolled back below
            published_id = webhooks.publish(
                session, USAGE_AGGREGATED, expected, event_id=aggregate_event_id(expected)
            )
            published = session.execute(
                select(WebhookEvent.tenant_id, cast(WebhookEvent.payload, Text)).where(
                    WebhookEvent.id == published_id
                )
            ).one()
        conn.rollback()
    assert tuple(computed) == (published_id, USAGE_AGGREGATED, *published, JAN)
    assert json.loads(published[1]) == expected


@pytest.mark.postgres
def test_concurrent_runs_of_one_day_store_one_total_one_event_and_its_deliveries(
    pg_engine: Engine, race: Callable[..., list[object]]
) -> None:
    factory = make_session_factory(pg_engine)
    ids = subscribe(factory)
    with factory.begin() as session:
        service = BillingService(session=session, tenant_id="t1")
        for n in range(3):
            service.record_usage(metric="tokens", amount=10, at=JAN, idempotency_key=f"k{n}")
    assert race(8, lambda _: aggregate_daily_job(factory, PAYLOAD)) == [30] * 8
    with factory() as session:
        assert session.scalars(select(UsageAggregate.total)).all() == [30]
        [event_id] = session.scalars(select(WebhookEvent.id)).all()
    expected = sorted((event_id, ids[role], "pending", 0) for role in ("any tenant", "t1"))
    assert deliveries(factory) == expected


@pytest.mark.postgres
def test_a_zone_changed_while_the_job_waited_for_its_lock_cuts_the_day(
    pg_engine: Engine, while_held: Callable[..., list[object]]
) -> None:
    """The job's first statement reads the zone in a snapshot taken before it got the lock;
    the zone change committed meanwhile is what its day is cut in (Kathmandu, not UTC)."""
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        BillingService(session=session, tenant_id="t1").record_usage(
            metric="tokens", amount=5, at=datetime(2025, 3, 8, 20, tzinfo=UTC), idempotency_key="k"
        )  # March 8 in UTC, March 9 01:45 in Kathmandu
    changing = factory()
    changing.begin()
    set_tenant(changing, "t1", timezone="Asia/Kathmandu")  # holds the zone lock
    payload = {**PAYLOAD, "day_start": "2025-03-09T00:00:00+00:00"}
    assert while_held(pg_engine, changing, lambda: aggregate_daily_job(factory, payload)) == [5]
    with factory() as session:
        [row] = session.execute(select(UsageAggregate.period_start, UsageAggregate.total)).all()
        [event] = session.scalars(select(WebhookEvent.payload)).all()
    assert tuple(row) == (datetime(2025, 3, 8, 18, 15, tzinfo=UTC), 5)
    assert event["day_start"] == "2025-03-09T00:00:00+05:45"
