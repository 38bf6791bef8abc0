"""The SQL delivery store: claims, leases, outcomes, streaks; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from webhooks import publish, verify
from webhooks.delivery import DeliveryClient, Sender
from webhooks.errors import DuplicateSubscriptionError
from webhooks.interfaces import AttemptResult
from webhooks.models import WebhookDelivery, WebhookSubscription
from webhooks.policy import Outcome, RetryPolicy
from webhooks.relay import Relay
from webhooks.settings import parse_schedule
from webhooks.sqltypes import utcnow
from webhooks.store import SqlDeliveryStore
from webhooks.subscriptions import SqlWebhookSubscriptions

TOPIC = "billing.invoice.created"
PAYLOAD = {"tenant_id": "t1", "invoice_id": "inv_1", "currency": "usd"}
LEASE = timedelta(minutes=5)
POLICY = RetryPolicy(schedule=parse_schedule("5s,5m"), jitter=0.0)


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def store(factory: sessionmaker[Session]) -> SqlDeliveryStore:
    return SqlDeliveryStore(factory)


def setup(factory, events: int = 1, **sub_fields) -> tuple[WebhookSubscription, list[str]]:
    with factory.begin() as session:
        sub = SqlWebhookSubscriptions(session).add(TOPIC, "https://example.test/hook", **sub_fields)
        ids = [publish(session, TOPIC, PAYLOAD) for _ in range(events)]
    return sub, ids


def rows(factory) -> list[WebhookDelivery]:
    with factory() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def result(delivery, outcome: Outcome, now) -> AttemptResult:
    return AttemptResult(delivery, outcome, POLICY.decide(delivery.attempt, outcome, now))


def test_claim_returns_what_is_needed_to_send_and_counts_the_attempt(factory, store) -> None:
    sub, [event_id] = setup(factory)
    now = utcnow()
    [claimed] = store.claim(10, now, LEASE)
    assert (claimed.event_id, claimed.topic, claimed.payload) == (event_id, TOPIC, PAYLOAD)
    assert (claimed.subscription_id, claimed.url, claimed.secrets) == (
        sub.id,
        sub.url,
        (sub.secret,),
    )
    assert claimed.attempt == 1
    [row] = rows(factory)
    assert (row.attempts, row.status, row.next_attempt_at) == (1, "pending", now + LEASE)


def test_each_delivery_of_one_claim_carries_its_own_subscriptions_secrets(factory, store) -> None:
    with factory.begin() as session:
        subs = SqlWebhookSubscriptions(session)
        first = subs.add(TOPIC, "https://one.test/hook")
        second = subs.add(TOPIC, "https://two.test/hook")
        for _ in range(2):
            publish(session, TOPIC, PAYLOAD)
    claimed = store.claim(10, utcnow(), LEASE)
    expected = {first.id: (first.secret,), second.id: (second.secret,)}
    assert sorted((d.subscription_id, d.secrets) for d in claimed) == sorted(
        [*expected.items(), *expected.items()]
    )


def test_a_claimed_delivery_is_not_claimed_again_until_its_lease_ends(factory, store) -> None:
    setup(factory)
    now = utcnow()
    assert len(store.claim(10, now, LEASE)) == 1
    assert store.claim(10, now + LEASE - timedelta(seconds=1), LEASE) == []
    [again] = store.claim(10, now + LEASE, LEASE)  # the relay that claimed it died
    assert again.attempt == 2


def test_claim_respects_the_limit_and_takes_the_oldest_first(factory, store) -> None:
    setup(factory, events=5)
    claimed = store.claim(3, utcnow(), LEASE)
    assert len(claimed) == 3
    assert len(store.claim(10, utcnow(), LEASE)) == 2


def test_disabled_subscriptions_are_not_claimed(factory, store) -> None:
    sub, _ = setup(factory)
    with factory.begin() as session:
        SqlWebhookSubscriptions(session).disable(sub.id)
    assert store.claim(10, utcnow(), LEASE) == []
    assert store.next_due() is None


def test_recording_a_success_marks_it_delivered(factory, store) -> None:
    setup(factory)
    now = utcnow()
    [claimed] = store.claim(10, now, LEASE)
    store.record([result(claimed, Outcome(status_code=200), now)], now, timedelta(days=5))
    [row] = rows(factory)
    assert (row.status, row.delivered_at, row.last_status_code) == ("delivered", now, 200)
    assert store.claim(10, now + timedelta(days=1), LEASE) == []


def test_recording_a_failure_schedules_the_retry_and_starts_the_streak(factory, store) -> None:
    sub, _ = setup(factory)
    now = utcnow()
    [claimed] = store.claim(10, now, LEASE)
    store.record(
        [result(claimed, Outcome(status_code=500, error="HTTP 500"), now)], now, timedelta(days=5)
    )
    [row] = rows(factory)
    assert (row.status, row.next_attempt_at, row.last_error) == (
        "failed",
        now + timedelta(seconds=5),
        "HTTP 500",
    )
    assert store.next_due() == now + timedelta(seconds=5)
    with factory() as session:
        assert session.get(WebhookSubscription, sub.id).failing_since == now


def test_a_stale_outcome_does_not_overwrite_a_newer_claim(factory, store) -> None:
    setup(factory)
    now = utcnow()
    [first] = store.claim(10, now, LEASE)
    [second] = store.claim(10, now + LEASE, LEASE)
    store.record([result(first, Outcome(status_code=500), now)], now, timedelta(days=5))
    [row] = rows(factory)
    assert (row.status, row.attempts) == ("pending", 2)
    store.record([result(second, Outcome(status_code=200), now)], now, timedelta(days=5))
    assert rows(factory)[0].status == "delivered"


def test_one_recording_settles_each_outcome_of_its_batch_and_skips_a_stale_one(
    factory, store
) -> None:
    setup(factory, events=3)
    now = utcnow()
    stale, ok, failing = store.claim(10, now, LEASE)
    again = store.claim(1, now + LEASE, LEASE)[0]  # `stale`'s lease ran out: claimed anew
    outcomes = [
        result(stale, Outcome(status_code=200), now),
        result(ok, Outcome(status_code=204), now),
        result(failing, Outcome(status_code=503, error="HTTP 503"), now),
    ]
    store.record(outcomes, now, timedelta(days=5))
    settled = [
        (r.status, r.attempts, r.last_status_code, r.last_error, r.delivered_at, r.claimed_until)
        for r in rows(factory)
    ]
    assert settled == [
        ("pending", 2, None, None, None, now + 2 * LEASE),
        ("delivered", 1, 204, None, now, None),
        ("failed", 1, 503, "HTTP 503", None, None),
    ]
    assert again.delivery_id == stale.delivery_id
    assert rows(factory)[2].next_attempt_at == now + timedelta(seconds=5)


def test_a_recording_of_successes_only_ends_the_failure_streak(factory, store) -> None:
    sub, _ = setup(factory, events=2)
    with factory.begin() as session:
        session.get(WebhookSubscription, sub.id).failing_since = utcnow() - timedelta(hours=1)
    now = utcnow()
    claimed = store.claim(10, now, LEASE)
    successes = [result(c, Outcome(status_code=200), now) for c in claimed]
    store.record(successes, now, timedelta(days=5))
    assert [r.status for r in rows(factory)] == ["delivered", "delivered"]
    with factory() as session:
        subscription = session.get(WebhookSubscription, sub.id)
        assert (subscription.failing_since, subscription.updated_at) == (None, now)


def test_release_hands_back_claims_uncounted(factory, store) -> None:
    setup(factory, events=3)
    now = utcnow()
    claimed = store.claim(10, now, LEASE)
    store.release(claimed[:2], now)
    again = store.claim(10, now, LEASE)
    assert sorted(d.delivery_id for d in again) == sorted(d.delivery_id for d in claimed[:2])
    assert {d.attempt for d in again} == {1}


def test_410_gone_disables_the_subscription(factory, store) -> None:
    sub, _ = setup(factory, events=2)
    now = utcnow()
    first, _second = store.claim(10, now, LEASE)
    store.record([result(first, Outcome(status_code=410), now)], now, timedelta(days=5))
    with factory() as session:
        row = session.get(WebhookSubscription, sub.id)
        assert row.enabled is False
        assert "410 Gone" in row.disabled_reason


def test_five_days_of_failures_disable_the_subscription(factory, store) -> None:
    sub, _ = setup(factory)
    start = utcnow()
    with factory.begin() as session:
        session.get(WebhookSubscription, sub.id).failing_since = start - timedelta(days=5)
    [claimed] = store.claim(10, start, LEASE)
    store.record([result(claimed, Outcome(error="timeout"), start)], start, timedelta(days=5))
    with factory() as session:
        row = session.get(WebhookSubscription, sub.id)
        assert row.enabled is False
        assert "last error: timeout" in row.disabled_reason


def test_a_relay_over_sql_delivers_with_both_signatures_during_a_rotation(factory, store) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    sub, _ = setup(factory)
    with factory.begin() as session:
        new = SqlWebhookSubscriptions(session).rotate_secret(sub.id, grace=timedelta(hours=1))
    client = DeliveryClient(httpx.MockTransport(handler))
    relay = Relay(store, Sender(client, user_agent="t"), POLICY)
    assert relay.run_once() == 1
    assert len(seen[0].headers["webhook-signature"].split(" ")) == 2
    assert verify(seen[0].content, seen[0].headers, new)
    assert verify(seen[0].content, seen[0].headers, sub.secret)
    assert [r.status for r in rows(factory)] == ["delivered"]


@pytest.mark.postgres
def test_concurrent_claims_never_share_a_delivery(pg_engine: Engine, race) -> None:
    factory = sessionmaker(pg_engine, expire_on_commit=False)
    setup(factory, events=300)
    store = SqlDeliveryStore(factory)

    def claim_all(_: int) -> list[str]:
        mine: list[str] = []
        while batch := store.claim(7, utcnow(), LEASE):
            mine += [d.delivery_id for d in batch]
        return mine

    claimed = race(6, claim_all)
    every = [i for mine in claimed for i in mine]
    assert len(every) == 300
    assert len(set(every)) == 300
    assert sum(1 for mine in claimed if mine) > 1


@pytest.mark.postgres
def test_a_claim_of_many_sends_the_statement_a_claim_of_few_does(pg_engine: Engine) -> None:
    """The claimed ids go to PostgreSQL as one array: the same statement text for 2 ids as for
    60 (psycopg converts it and PostgreSQL plans it once), and each of them is taken."""
    factory = sessionmaker(pg_engine, expire_on_commit=False)
    setup(factory, events=62)
    store = SqlDeliveryStore(factory)
    takes: list[str] = []

    def seen(conn, cursor, statement: str, *_) -> None:
        if statement.startswith("UPDATE webhook_deliveries SET attempts"):
            takes.append(statement)

    event.listen(pg_engine, "before_cursor_execute", seen)
    try:
        few, many = store.claim(2, utcnow(), LEASE), store.claim(100, utcnow(), LEASE)
    finally:
        event.remove(pg_engine, "before_cursor_execute", seen)
    assert (len(few), len(many), {d.attempt for d in few + many}) == (2, 60, {1})
    assert len({d.delivery_id for d in few + many}) == 62
    assert len(takes) == 2
    assert takes[0] == takes[1]


def add_sub(factory, url: str, events: int) -> str:
    with factory.begin() as session:
        sub = SqlWebhookSubscriptions(session).add(TOPIC, url, tenant_id=url)
        for _ in range(events):
            publish(session, TOPIC, PAYLOAD | {"tenant_id": url})
    return sub.id


def test_a_claim_takes_at_most_the_cap_of_one_subscription_round_robin(factory, store) -> None:
    busy = add_sub(factory, "https://busy.test/hook", events=5)
    quiet = add_sub(factory, "https://quiet.test/hook", events=2)
    claimed = store.claim(10, utcnow(), LEASE, max_in_flight=2)
    assert [d.subscription_id for d in claimed] == [busy, quiet, busy, quiet]


def test_deliveries_in_flight_count_against_the_cap_until_recorded(factory, store) -> None:
    setup(factory, events=5)
    now = utcnow()
    first = store.claim(10, now, LEASE, max_in_flight=2)
    assert len(first) == 2
    assert store.claim(10, now, LEASE, max_in_flight=2) == []
    store.record([result(first[0], Outcome(status_code=200), now)], now, timedelta(days=5))
    [third] = store.claim(10, now, LEASE, max_in_flight=2)
    assert third.delivery_id not in {d.delivery_id for d in first}
    assert store.claim(10, now, LEASE, max_in_flight=2) == []


def test_a_released_claim_frees_its_slot(factory, store) -> None:
    setup(factory, events=3)
    now = utcnow()
    first = store.claim(10, now, LEASE, max_in_flight=2)
    assert store.claim(10, now, LEASE, max_in_flight=2) == []
    store.release(first[:1], now)
    assert len(store.claim(10, now, LEASE, max_in_flight=2)) == 1


def test_the_claims_of_a_dead_relay_stop_counting_when_their_lease_ends(factory, store) -> None:
    setup(factory, events=3)
    now = utcnow()
    assert len(store.claim(10, now, LEASE, max_in_flight=2)) == 2
    later = now + LEASE
    assert len(store.claim(10, later, LEASE, max_in_flight=2)) == 2  # the same two, again


def test_a_claimed_delivery_knows_when_its_lease_ends(factory, store) -> None:
    setup(factory)
    now = utcnow()
    [claimed] = store.claim(10, now, LEASE, max_in_flight=2)
    assert claimed.lease_ends_at == now + LEASE


@pytest.mark.postgres
def test_concurrent_claims_never_exceed_the_cap_of_a_subscription(pg_engine: Engine, race) -> None:
    factory = sessionmaker(pg_engine, expire_on_commit=False)
    subs = [add_sub(factory, f"https://s{i}.test/hook", events=10) for i in range(5)]
    store = SqlDeliveryStore(factory)
    now = utcnow()

    def claim_twice(_: int) -> list[str]:
        twice = [store.claim(3, now, LEASE, max_in_flight=2) for _ in range(2)]
        return [d.subscription_id for claimed in twice for d in claimed]

    claimed = [sub for mine in race(6, claim_twice) for sub in mine]
    assert sorted(claimed) == sorted(subs * 2)


@pytest.mark.postgres
def test_concurrent_adds_of_one_target_store_one_subscription(
    pg_engine: Engine, while_held
) -> None:
    """The second add waits for the first's transaction (not a fixed pause: PostgreSQL says
    it waits), then sees its subscription."""
    factory = sessionmaker(pg_engine, expire_on_commit=False)
    first = factory()
    first.begin()
    SqlWebhookSubscriptions(first).add(TOPIC, "https://example.test/hook", tenant_id="t")

    def second() -> str:
        try:
            with factory.begin() as session:
                SqlWebhookSubscriptions(session).add(
                    TOPIC, "https://example.test/hook", tenant_id="t"
                )
        except DuplicateSubscriptionError as error:
            return error.existing_id
        return "stored"

    refused = while_held(pg_engine, first, second)
    with factory() as session:
        ids = session.scalars(select(WebhookSubscription.id)).all()
    assert len(ids) == 1
    assert refused == ids


def test_a_failed_attempt_frees_its_slot_while_it_waits_for_its_retry(factory, store) -> None:
    setup(factory, events=3)
    now = utcnow()
    first = store.claim(10, now, LEASE, max_in_flight=2)
    failed = result(first[0], Outcome(status_code=500, error="HTTP 500"), now)
    store.record([failed], now, timedelta(days=5))
    [third] = store.claim(10, now, LEASE, max_in_flight=2)
    assert third.delivery_id not in {d.delivery_id for d in first}
