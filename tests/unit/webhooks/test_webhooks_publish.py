"""`publish` writes the event and its deliveries in the caller's transaction, once per event id."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from webhooks import publish
from webhooks.errors import InvalidEventError
from webhooks.models import WebhookDelivery, WebhookEvent, WebhookSubscription

TOPIC = "billing.usage_aggregated"
PAYLOAD = {
    "tenant_id": "t1",
    "metric": "tokens",
    "day_start": "2025-01-01T00:00:00+00:00",
    "total": 42,
}


def subscribe(session: Session, topic: str = TOPIC, **fields) -> str:
    sub = WebhookSubscription(
        topic=topic, url="https://example.test/hook", secret="whsec_c2VrcmV0", **fields
    )
    session.add(sub)
    session.flush()
    return sub.id


def deliveries(session: Session) -> list[WebhookDelivery]:
    return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.subscription_id)))


def test_publish_writes_the_event_and_one_pending_delivery_per_subscription(
    session: Session,
) -> None:
    first, second = subscribe(session), subscribe(session)
    subscribe(session, topic="billing.invoice.created")

    event_id = publish(session, TOPIC, PAYLOAD)

    event = session.get(WebhookEvent, event_id)
    assert event is not None
    assert (event.topic, event.tenant_id, event.payload) == (TOPIC, "t1", PAYLOAD)
    rows = deliveries(session)
    assert sorted(d.subscription_id for d in rows) == sorted([first, second])
    assert {(d.event_id, d.status, d.attempts) for d in rows} == {(event_id, "pending", 0)}
    assert all(d.next_attempt_at is not None and d.next_attempt_at.tzinfo is UTC for d in rows)


def test_disabled_subscriptions_get_no_delivery(session: Session) -> None:
    subscribe(session, enabled=False)
    publish(session, TOPIC, PAYLOAD)
    assert deliveries(session) == []


def test_tenant_filter_picks_the_payloads_tenant_only(session: Session) -> None:
    everyone = subscribe(session)
    mine = subscribe(session, tenant_id="t1")
    subscribe(session, tenant_id="t2")

    publish(session, TOPIC, PAYLOAD)

    assert sorted(d.subscription_id for d in deliveries(session)) == sorted([everyone, mine])


def test_payload_without_tenant_goes_to_unfiltered_subscriptions_only(session: Session) -> None:
    everyone = subscribe(session)
    subscribe(session, tenant_id="t1")
    publish(session, TOPIC, {"metric": "tokens"})
    assert [d.subscription_id for d in deliveries(session)] == [everyone]


def test_an_event_nobody_subscribes_to_is_kept(session: Session) -> None:
    event_id = publish(session, TOPIC, PAYLOAD)
    assert session.get(WebhookEvent, event_id) is not None
    assert deliveries(session) == []


def test_the_same_event_id_twice_is_stored_once(session: Session) -> None:
    subscribe(session)
    assert (
        publish(session, TOPIC, PAYLOAD, event_id="agg:t1:tokens:2025-01-01")
        == "agg:t1:tokens:2025-01-01"
    )
    subscribe(session)  # a new subscriber does not turn a re-run into a second event
    assert publish(
        session, TOPIC, {**PAYLOAD, "total": 43}, event_id="agg:t1:tokens:2025-01-01"
    ) == ("agg:t1:tokens:2025-01-01")

    assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 1
    assert session.get(WebhookEvent, "agg:t1:tokens:2025-01-01").payload["total"] == 42
    assert len(deliveries(session)) == 1


def test_generated_event_ids_are_distinct(session: Session) -> None:
    assert publish(session, TOPIC, PAYLOAD) != publish(session, TOPIC, PAYLOAD)


def test_publish_does_not_commit(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        subscribe(session)
        event_id = publish(session, TOPIC, PAYLOAD)
        session.rollback()
    with session_factory() as session:
        assert session.get(WebhookEvent, event_id) is None
        assert deliveries(session) == []


@pytest.mark.parametrize(
    ("topic", "payload", "event_id"),
    [
        ("", PAYLOAD, None),
        ("has space", PAYLOAD, None),
        ("x" * 201, PAYLOAD, None),
        (TOPIC, ["not", "an", "object"], None),
        (TOPIC, {"at": datetime(2025, 1, 1, tzinfo=UTC)}, None),
        (TOPIC, {"ratio": float("nan")}, None),
        (TOPIC, PAYLOAD, ""),
        (TOPIC, PAYLOAD, "has space"),
        (TOPIC, PAYLOAD, "line\nbreak"),
        (TOPIC, PAYLOAD, "x" * 256),
    ],
)
def test_bad_input_raises_and_stores_nothing(session: Session, topic, payload, event_id) -> None:
    subscribe(session)
    with pytest.raises(InvalidEventError):
        publish(session, topic, payload, event_id=event_id)
    assert session.scalars(select(WebhookEvent)).all() == []
    assert deliveries(session) == []


@pytest.mark.postgres
def test_concurrent_publishes_of_one_event_id_store_it_once_without_error(
    pg_engine: Engine, race
) -> None:
    factory = sessionmaker(pg_engine)
    with factory.begin() as session:
        subscribe(session)

    def publish_once(_: int) -> str:
        with factory.begin() as session:
            return publish(session, TOPIC, PAYLOAD, event_id="same-event")

    assert race(8, publish_once) == ["same-event"] * 8
    with factory() as session:
        assert [e.id for e in session.scalars(select(WebhookEvent))] == ["same-event"]
        assert len(deliveries(session)) == 1


@pytest.mark.postgres
def test_publish_notifies_the_relay_channel_at_commit(pg_engine: Engine, outbox_listener) -> None:
    factory = sessionmaker(pg_engine)
    with factory.begin() as session:
        subscribe(session)
        publish(session, TOPIC, PAYLOAD)
        assert list(outbox_listener.notifies(timeout=0.2)) == []  # nothing before the commit
    received = list(outbox_listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in received] == ["webhooks_outbox"]


@pytest.mark.postgres
def test_an_event_published_after_a_rolled_back_savepoint_still_wakes_the_relay(
    pg_engine: Engine, outbox_listener
) -> None:
    factory = sessionmaker(pg_engine)
    with factory.begin() as session:
        subscribe(session)
        savepoint = session.begin_nested()
        publish(session, TOPIC, PAYLOAD)
        savepoint.rollback()
        publish(session, TOPIC, PAYLOAD)
    received = list(outbox_listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in received] == ["webhooks_outbox"]
