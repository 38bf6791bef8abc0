"""Slots holding chains: a claim may take several of one subscription's deliveries into one slot,
the cap counts slots, and a held slot is fed more (`extend`); on SQLite and PostgreSQL, and in
memory."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from webhooks import InMemoryOutboxStore, InMemoryWebhookSubscriptions, WebhookService, publish
from webhooks.delivery import ClaimedDelivery
from webhooks.interfaces import AttemptResult, DeliveryStore
from webhooks.models import WebhookDelivery
from webhooks.policy import Outcome, RetryPolicy
from webhooks.replay import replay
from webhooks.settings import parse_schedule
from webhooks.sqltypes import utcnow
from webhooks.store import SqlDeliveryStore
from webhooks.subscriptions import SqlWebhookSubscriptions

TOPIC = "billing.invoice.created"
LEASE = timedelta(minutes=5)
POLICY = RetryPolicy(schedule=parse_schedule("5s,5m"), jitter=0.0)
DAYS = timedelta(days=5)


class Sql:
    """Subscriptions and events in SQL, and the store over them."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.store: DeliveryStore = SqlDeliveryStore(factory)

    def add(self, name: str, events: int) -> str:
        url = f"https://{name}.test/hook"
        with self.factory.begin() as session:
            sub = SqlWebhookSubscriptions(session).add(TOPIC, url, tenant_id=name)
            for _ in range(events):
                publish(session, TOPIC, {"tenant_id": name, "invoice_id": "i"})
        return sub.id

    def claimed(self) -> list[tuple[str, str | None]]:
        """(subscription, slot) of each delivery claimed now."""
        query = select(WebhookDelivery.subscription_id, WebhookDelivery.slot).where(
            WebhookDelivery.claimed_until.is_not(None)
        )
        with self.factory() as session:
            return [(sid, slot) for sid, slot in session.execute(query)]


class Memory:
    def __init__(self) -> None:
        self.store = self.outbox = InMemoryOutboxStore()
        self.subs = InMemoryWebhookSubscriptions()
        self.service = WebhookService(outbox=self.outbox, subs=self.subs)

    def add(self, name: str, events: int) -> str:
        sub = self.subs.add(TOPIC, url=f"https://{name}.test/hook", tenant_id=name)
        for _ in range(events):
            self.service.publish(TOPIC, {"tenant_id": name, "invoice_id": "i"})
        return sub.id

    def claimed(self) -> list[tuple[str, str | None]]:
        return [(d.subscription.id, d.slot) for d in self.outbox.deliveries() if d.claimed_until]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def world(request: pytest.FixtureRequest) -> Sql | Memory:
    if request.param == "memory":
        return Memory()
    engine = request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")
    return Sql(sessionmaker(engine, expire_on_commit=False))


def delivered(claimed: ClaimedDelivery) -> AttemptResult:
    outcome = Outcome(status_code=200)
    return AttemptResult(claimed, outcome, POLICY.decide(claimed.attempt, outcome, utcnow()))


def test_a_chained_claim_takes_a_chain_per_subscription_into_one_slot(world) -> None:
    busy = world.add("busy", events=5)
    quiet = world.add("quiet", events=1)
    claimed = world.store.claim(10, utcnow(), LEASE, max_in_flight=2, chain=3)
    assert Counter(d.subscription_id for d in claimed) == {busy: 3, quiet: 1}
    assert [d.subscription_id for d in claimed][:2] in ([busy, quiet], [quiet, busy])
    [slot] = {d.slot for d in claimed}
    assert slot is not None
    assert all(d.attempt == 1 for d in claimed)


def test_a_chain_counts_once_against_the_cap(world) -> None:
    sid = world.add("busy", events=9)
    now = utcnow()
    first = world.store.claim(10, now, LEASE, max_in_flight=2, chain=3)
    second = world.store.claim(10, now, LEASE, max_in_flight=2, chain=3)
    assert (len(first), len(second)) == (3, 3)
    assert first[0].slot != second[0].slot
    assert world.store.claim(10, now, LEASE, max_in_flight=2, chain=3) == []
    slots = {slot for s, slot in world.claimed() if s == sid}
    assert len(slots) == 2


def test_without_a_chain_each_delivery_is_its_own_slot(world) -> None:
    world.add("busy", events=5)
    claimed = world.store.claim(10, utcnow(), LEASE, max_in_flight=2)
    assert [d.slot for d in claimed] == [None, None]


def test_a_recorded_chain_frees_its_slot(world) -> None:
    world.add("busy", events=5)
    now = utcnow()
    first = world.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    assert world.store.claim(10, now, LEASE, max_in_flight=1, chain=2) == []
    world.store.record([delivered(d) for d in first], now, DAYS)
    assert len(world.store.claim(10, now, LEASE, max_in_flight=1, chain=2)) == 2


def test_a_held_slot_is_fed_more_of_its_subscription(world) -> None:
    sid = world.add("busy", events=6)
    world.add("other", events=2)
    now = utcnow()
    [head, _] = [
        d for d in world.store.claim(10, now, LEASE, 1, chain=2) if d.subscription_id == sid
    ]
    world.store.record([delivered(head)], now, DAYS)  # one of the slot's two is still claimed
    more = world.store.extend(head.slot, sid, 3, now, LEASE)
    assert len(more) == 3
    assert {(d.subscription_id, d.slot, d.attempt) for d in more} == {(sid, head.slot, 1)}
    assert {slot for s, slot in world.claimed() if s == sid} == {head.slot}


def test_a_free_slot_is_not_fed(world) -> None:
    sid = world.add("busy", events=4)
    now = utcnow()
    chain = world.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    world.store.record([delivered(d) for d in chain], now, DAYS)
    assert world.store.extend(chain[0].slot, sid, 2, now, LEASE) == []


def test_a_slot_whose_lease_ran_out_is_not_fed(world) -> None:
    sid = world.add("busy", events=4)
    now = utcnow()
    chain = world.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    assert world.store.extend(chain[0].slot, sid, 2, now + LEASE, LEASE) == []


def test_a_handed_back_delivery_leaves_its_slot(world) -> None:
    world.add("busy", events=3)
    now = utcnow()
    chain = world.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    world.store.release(chain, now)
    assert world.claimed() == []
    again = world.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    assert [d.attempt for d in again] == [1, 1]


@pytest.mark.postgres
def test_concurrent_chained_claims_and_feeds_never_exceed_the_cap(pg_engine: Engine, race) -> None:
    sql = Sql(sessionmaker(pg_engine, expire_on_commit=False))
    subs = [sql.add(f"s{i}", events=12) for i in range(4)]
    now = utcnow()
    most: Counter[str] = Counter()
    lock = threading.Lock()

    def claim_and_feed(_: int) -> None:
        for _ in range(3):
            for d in sql.store.claim(4, now, LEASE, max_in_flight=2, chain=2):
                sql.store.extend(d.slot, d.subscription_id, 1, now, LEASE)
            slots = Counter(sid for sid, _ in set(sql.claimed()))
            with lock:
                for sid, count in slots.items():
                    most[sid] = max(most[sid], count)

    assert race(6, claim_and_feed) == [None] * 6
    assert set(most) == set(subs)
    assert max(most.values()) == 2


def test_a_handed_back_delivery_keeps_its_place_in_the_queue(world) -> None:
    world.add("busy", events=2)
    now = utcnow()
    [first] = world.store.claim(1, now, LEASE)
    world.store.release([first], now + timedelta(minutes=1))
    [again] = world.store.claim(1, now + timedelta(minutes=1), LEASE)
    assert again.delivery_id == first.delivery_id
    assert again.due_at == first.due_at


def test_a_failing_subscription_gets_a_chain_of_one_per_claim(world) -> None:
    world.add("down", events=8)
    now = utcnow()
    [head, *_] = world.store.claim(10, now, LEASE, max_in_flight=2, chain=3)
    failed = Outcome(error="connection refused")
    world.store.record(
        [AttemptResult(head, failed, POLICY.decide(head.attempt, failed, now))], now, DAYS
    )
    [one] = world.store.claim(10, now, LEASE, max_in_flight=2, chain=3)
    assert one.slot is not None


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def sql(request: pytest.FixtureRequest) -> Sql:
    engine = request.getfixturevalue("sqlite_engine" if request.param == "sqlite" else "pg_engine")
    return Sql(sessionmaker(engine, expire_on_commit=False))


def test_a_delivery_replayed_while_claimed_leaves_its_slot(sql) -> None:
    sql.add("busy", events=1)
    now = utcnow()
    [claimed] = sql.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    with sql.factory.begin() as session:
        assert replay(session, event_id=claimed.event_id, now=lambda: now) == 1
    assert sql.claimed() == []
    [again] = sql.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    assert (again.delivery_id, again.attempt) == (claimed.delivery_id, 1)


def test_the_outcome_of_an_attempt_made_before_a_replay_is_not_recorded(sql) -> None:
    """The replay's claim counts attempt 1 again: the older claim's outcome must not be written
    over it (it would end the claim while its attempt is in flight, and a third claim follow)."""
    sql.add("busy", events=1)
    now = utcnow()
    [before] = sql.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    with sql.factory.begin() as session:
        replay(session, event_id=before.event_id, now=lambda: now)
    later = now + timedelta(seconds=1)
    [replayed] = sql.store.claim(10, later, LEASE, max_in_flight=1, chain=2)
    assert replayed.attempt == before.attempt == 1
    failed = Outcome(error="connection refused")
    stale = AttemptResult(before, failed, POLICY.decide(before.attempt, failed, later))
    sql.store.record([stale], later, DAYS)
    assert [slot for _, slot in sql.claimed()] == [replayed.slot]
    sql.store.record([delivered(replayed)], later, DAYS)
    assert sql.claimed() == []


def test_a_claim_made_before_a_replay_handed_back_leaves_the_claim_made_since(sql) -> None:
    """A relay that stops (or whose chain's lease ran out) hands back what it claimed before a
    replay: the replayed delivery's new claim, its attempt in flight, must stay held (no third
    claim sends it again) and its success be recorded."""
    sql.add("busy", events=1)
    now = utcnow()
    [before] = sql.store.claim(10, now, LEASE, max_in_flight=1, chain=2)
    with sql.factory.begin() as session:
        replay(session, event_id=before.event_id, now=lambda: now)
    later = now + timedelta(seconds=1)
    [replayed] = sql.store.claim(10, later, LEASE, max_in_flight=1, chain=2)
    assert replayed.attempt == before.attempt == 1
    sql.store.release([before], later)
    assert [slot for _, slot in sql.claimed()] == [replayed.slot]
    assert sql.store.claim(10, later + timedelta(seconds=2), LEASE, max_in_flight=1, chain=2) == []
    sql.store.record([delivered(replayed)], later, DAYS)
    with sql.factory() as session:
        row = session.scalars(select(WebhookDelivery)).one()
    assert (row.status, row.attempts, row.claimed_until) == ("delivered", 1, None)
