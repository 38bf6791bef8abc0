"""The relay sends a subscription at its cap chains of deliveries, one after another in a slot,
feeds a chain running low from its slot, and hands a chain back when it fails or stops."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime

import httpx

from webhooks import InMemoryOutboxStore, InMemoryWebhookSubscriptions, WebhookService
from webhooks.delivery import DeliveryClient, Sender
from webhooks.interfaces import AttemptResult
from webhooks.policy import Outcome, RetryPolicy
from webhooks.relay import Relay
from webhooks.settings import parse_schedule
from webhooks.sqltypes import utcnow

from .test_webhooks_relay import run_relay_until

TOPIC = "billing.usage_aggregated"
PAYLOAD = {"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01T00:00:00+00:00"}
URL = "https://subscriber.test/hook"
POLICY = RetryPolicy(schedule=parse_schedule("5s,5m"), jitter=0.0)


class Counting(InMemoryOutboxStore):
    """Counts the claims and feeds that took something, and the most deliveries in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.took: Counter[str] = Counter()

    def claim(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        claimed = super().claim(*args, **kwargs)
        self.took["claim"] += bool(claimed)
        return claimed

    def extend(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        claimed = super().extend(*args, **kwargs)
        self.took["extend"] += bool(claimed)
        return claimed


class World:
    def __init__(self, handler: Callable[[httpx.Request], httpx.Response], **options) -> None:
        self.outbox = Counting()
        self.subs = InMemoryWebhookSubscriptions()
        self.service = WebhookService(outbox=self.outbox, subs=self.subs)
        self.client = DeliveryClient(httpx.MockTransport(handler))
        self.relay = Relay(
            self.outbox,
            Sender(self.client, user_agent="test"),
            POLICY,
            **options,
        )

    def publish(self, count: int) -> None:
        self.subs.add(TOPIC, url=URL)
        for _ in range(count):
            self.service.publish(TOPIC, PAYLOAD)

    def statuses(self) -> list[tuple[str, int, bool]]:
        return [(d.status, d.attempts, d.claimed_until is None) for d in self.outbox.deliveries()]

    def run_until(self, done: Callable[[], bool], stop: threading.Event | None = None) -> None:
        run_relay_until(self.relay, done, stop)


class Overlap:
    """A subscriber that notes the most requests it had in flight at once."""

    def __init__(self) -> None:
        self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        threading.Event().wait(0.001)
        with self.lock:
            self.in_flight -= 1
        return httpx.Response(200)


def busy_world(subscriber: Callable[[httpx.Request], httpx.Response]) -> World:
    # Chains of 4 (half a batch of 8), one slot; a poll far longer than the test: every next
    # delivery is started, fed or claimed without waiting for it.
    world = World(subscriber, batch_size=8, max_in_flight_per_subscription=1, poll_interval=600)
    world.publish(40)
    return world


def test_a_subscription_at_its_cap_gets_chains_not_one_claim_per_delivery() -> None:
    subscriber = Overlap()
    world = busy_world(subscriber)
    world.run_until(lambda: all(s == "delivered" for s, _, _ in world.statuses()))
    assert [s for s, _, _ in world.statuses()] == ["delivered"] * 40
    assert subscriber.most == 1
    assert sum(world.outbox.took.values()) <= 40 // 2


def test_a_chain_running_low_is_fed_from_its_slot() -> None:
    world = busy_world(Overlap())
    world.run_until(lambda: all(s == "delivered" for s, _, _ in world.statuses()))
    assert world.outbox.took["extend"] >= 1


def claim_chain(world: World, count: int) -> list:
    world.publish(count)
    claimed = world.outbox.claim(10, utcnow(), world.relay.lease, 1, chain=count)
    assert len({d.slot for d in claimed}) == 1
    return claimed


def outcome_of(delivery, outcome: Outcome, now: datetime) -> AttemptResult:
    return AttemptResult(delivery, outcome, POLICY.decide(delivery.attempt, outcome, now))


def test_a_chain_whose_attempt_was_not_made_is_handed_back_whole() -> None:
    requests: list[httpx.Request] = []
    world = World(lambda r: requests.append(r) or httpx.Response(200))
    first, *rest = claim_chain(world, 3)
    assert world.relay._chain_heads([first, *rest]) == [first]
    assert world.relay._next_in_chain(first, None) is None  # its lease ran out, or it raised
    assert requests == []
    assert world.relay._chains == {}
    assert world.statuses()[1:] == [("pending", 0, True), ("pending", 0, True)]


def test_a_failing_subscription_gets_chains_of_one() -> None:
    world = World(lambda r: httpx.Response(200))
    world.publish(3)
    [sub] = world.subs.matching(TOPIC, None)
    sub.failing_since = utcnow()
    claimed = world.outbox.claim(10, utcnow(), world.relay.lease, 2, chain=3)
    assert len(claimed) == 1
    assert claimed[0].slot is not None


def test_a_chains_task_makes_each_attempt_in_turn_to_its_end_even_failed_ones() -> None:
    requests: list[httpx.Request] = []
    world = World(lambda r: requests.append(r) or httpx.Response(500))
    first, second, third = claim_chain(world, 3)
    world.relay._chain_heads([first, second, third])
    world.relay._deliver_chain(first)
    sent = [first.event_id, second.event_id, third.event_id]
    assert [r.headers["webhook-id"] for r in requests] == sent
    assert world.relay._chains == {}
    assert [status for status, _, _ in world.statuses()] == ["pending"] * 3  # not recorded yet
    assert world.relay._done.qsize() == 3


class NotingSlots(queue.SimpleQueue[AttemptResult]):
    """Outcomes queued, each noted with whether recording it then would free a slot."""

    def __init__(self, relay: Relay) -> None:
        self.relay, self.frees = relay, []

    def put(self, item: AttemptResult, block: bool = True, timeout: float | None = None) -> None:
        self.frees.append(self.relay._frees_slots([item]))
        super().put(item, block, timeout)


def test_only_a_chains_last_outcome_frees_its_slot_when_recorded() -> None:
    """Recording outcomes of a chain going on leaves its slot held: the recorder does not wake
    the relay to claim again (at the cap it would find nothing); the chain's last does."""
    world = World(lambda r: httpx.Response(200))
    first, second, third = claim_chain(world, 3)
    world.relay._done = noted = NotingSlots(world.relay)
    world.relay._chain_heads([first, second, third])
    world.relay._deliver_chain(first)
    assert noted.frees == [False, False, True]
    alone = outcome_of(replace(first, slot=None), Outcome(status_code=200), utcnow())
    assert world.relay._frees_slots([alone])


def test_a_busy_subscriptions_long_chain_does_not_hold_back_another_subscriptions_claim() -> None:
    requests: list[httpx.Request] = []
    world = World(
        lambda r: requests.append(r) or httpx.Response(200),
        batch_size=8,
        max_in_flight_per_subscription=1,
    )
    world.publish(30)
    waiting = world.outbox.claim(30, utcnow(), world.relay.lease, 1, chain=30)
    assert len(world.relay._chain_heads(waiting)) == 1  # 29 wait: above 16 + 8 // 2
    world.subs.add(TOPIC, url="https://other.test/hook")
    world.service.publish(TOPIC, PAYLOAD)  # to both; the busy one is at its cap
    with ThreadPoolExecutor(1) as pool:
        assert world.relay._claim_into(pool) == 1
    assert [str(r.url) for r in requests] == ["https://other.test/hook"]


def test_stopping_hands_back_the_deliveries_of_a_chain_not_started() -> None:
    arrived, answer = threading.Event(), threading.Event()

    def held(request: httpx.Request) -> httpx.Response:
        arrived.set()
        answer.wait(10)
        return httpx.Response(200)

    world = World(held, batch_size=8, max_in_flight_per_subscription=1, poll_interval=600)
    world.publish(4)
    stop = threading.Event()

    def stop_while_the_first_is_in_flight() -> None:
        arrived.wait(10)
        stop.set()
        world.relay.wake.set()
        deadline = time.monotonic() + 10
        while world.statuses()[1:] != [("pending", 0, True)] * 3:  # handed back
            if time.monotonic() > deadline:
                break
            threading.Event().wait(0.005)
        answer.set()

    threading.Thread(target=stop_while_the_first_is_in_flight).start()
    world.run_until(lambda: answer.is_set(), stop)
    assert world.statuses() == [("delivered", 1, True)] + [("pending", 0, True)] * 3


def test_the_chain_is_half_a_batch_and_at_least_one() -> None:
    world = World(Overlap(), batch_size=9, concurrency=3, max_in_flight_per_subscription=2)
    assert world.relay.chain == 4
    world.relay.batch_size = 1
    assert world.relay.chain == 1


def test_there_are_no_chains_when_the_cap_does_not_hold_a_subscription_below_concurrency() -> None:
    world = World(Overlap(), batch_size=9, concurrency=3, max_in_flight_per_subscription=3)
    assert world.relay.chain == 1
    world.relay.max_in_flight_per_subscription = None
    assert world.relay.chain == 1


def low_chain(world: World, waiting: int) -> tuple[tuple[str, str], list]:
    """A chain of 4 claimed, its head in flight (held by the store), `waiting` of the rest
    still waiting, and the chain marked running low; return its key and every delivery."""
    claimed = claim_chain(world, 4)
    head = claimed[0]
    key = (head.slot, head.subscription_id)
    world.relay._chain_heads(claimed)
    for _ in range(3 - waiting):
        world.relay._chains[key].popleft()
    world.relay._low = {key}
    return key, claimed


def publish_more(world: World, count: int) -> None:
    for _ in range(count):
        world.service.publish(TOPIC, PAYLOAD)


def fed_world(requests: list[httpx.Request]) -> World:
    world = World(
        lambda r: requests.append(r) or httpx.Response(200),
        batch_size=8,
        max_in_flight_per_subscription=1,
    )
    assert world.relay.chain == 4
    return world


def test_a_chain_running_low_is_topped_up_to_a_full_chain_from_its_slot() -> None:
    requests: list[httpx.Request] = []
    world = fed_world(requests)
    key, _ = low_chain(world, waiting=1)
    publish_more(world, 6)  # due, of the same subscription
    with ThreadPoolExecutor(1) as pool:
        assert world.relay._extend_chains(pool) == 3
    assert len(world.relay._chains[key]) == 4  # the fed ones wait their turn in the chain
    assert world.relay._in_flight_count() == 4  # claimed, not finished
    assert requests == []
    assert world.relay._low == set()


def test_a_chain_that_ended_before_it_was_fed_starts_again_with_what_its_slot_took() -> None:
    requests: list[httpx.Request] = []
    world = fed_world(requests)
    key, claimed = low_chain(world, waiting=0)
    del world.relay._chains[key]  # its last attempt finished before the feed
    before = {d.id for d in world.outbox.deliveries()}
    publish_more(world, 6)
    fed = [d.id for d in world.outbox.deliveries() if d.id not in before][:4]
    with ThreadPoolExecutor(1) as pool:
        assert world.relay._claim_into(pool) == 4  # the rest wait: the slot is the cap's one
        deadline = time.monotonic() + 10
        while len(requests) < 4 and time.monotonic() < deadline:
            threading.Event().wait(0.005)
    sent = [r.headers["webhook-id"] for r in requests]
    assert sent == [d.event.id for d in world.outbox.deliveries() if d.id in fed]
    assert world.relay._chains == {}


class FailingFirstExtend(Counting):
    """Its first `extend` fails, as a database error would."""

    failed = False

    def extend(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise ConnectionError("database unreachable")
        return super().extend(*args, **kwargs)


def test_a_chain_whose_feed_fails_ends_and_the_other_chains_are_still_fed(caplog) -> None:
    world = World(Overlap(), batch_size=8, max_in_flight_per_subscription=1)
    world.outbox = world.relay.store = FailingFirstExtend()  # type: ignore[assignment]
    world.service = WebhookService(outbox=world.outbox, subs=world.subs)
    world.subs.add(TOPIC, url=URL)
    world.subs.add(TOPIC, url=URL + "/2")
    world.subs.add(TOPIC, url=URL + "/3")
    for _ in range(10):
        world.service.publish(TOPIC, PAYLOAD)
    claimed = world.outbox.claim(12, utcnow(), world.relay.lease, 1, chain=4)
    world.relay._chain_heads(claimed)
    keys = sorted(world.relay._chains)
    assert len(keys) == 3
    for key in keys:
        world.relay._chains[key].clear()
    world.relay._low = set(keys)
    with caplog.at_level("ERROR", logger="webhooks.relay"), ThreadPoolExecutor(1) as pool:
        assert world.relay._extend_chains(pool) == 8
    assert [len(world.relay._chains[key]) for key in keys] == [0, 4, 4]
    assert [r.getMessage() for r in caplog.records] == [
        "extending a chain failed; its slot ends with it"
    ]


def test_a_chain_with_under_half_a_chain_waiting_is_marked_low_once_and_wakes_the_relay() -> None:
    """Chains of 5: of 4 waiting behind the head, taking the third leaves 1 (< 5 // 2) and
    marks the chain low (once), waking the relay to feed it; 3 and 2 left are not low. A chain
    that ends is no longer low."""
    world = World(Overlap(), batch_size=10, max_in_flight_per_subscription=1)
    assert world.relay.chain == 5
    claimed = claim_chain(world, 5)
    first = claimed[0]
    key = (first.slot, first.subscription_id)
    relay = world.relay
    assert relay._chain_heads(claimed) == [first]
    low: list[tuple[int | None, bool, bool]] = []
    following = []
    for _step in range(5):
        relay.wake.clear()
        result = outcome_of(first, Outcome(status_code=200), utcnow())
        following.append(relay._next_in_chain(first, result))
        waiting = relay._chains.get(key)
        low.append(
            (None if waiting is None else len(waiting), key in relay._low, relay.wake.is_set())
        )
    assert low == [
        (3, False, False),
        (2, False, False),
        (1, True, True),
        (0, True, False),
        (None, False, False),  # the chain is over: nothing to feed, nothing to wake for
    ]
    assert following == [*claimed[1:], None]


def test_a_chain_running_low_wakes_the_relay_to_feed_it_not_to_claim() -> None:
    """At its cap a subscription's claim would find nothing: a feed alone claims nothing; a
    wake-up asking for work (a NOTIFY, a freed slot, the poll) claims."""
    world = fed_world([])
    low_chain(world, waiting=1)
    publish_more(world, 6)
    claims: list[int] = []
    claim = world.outbox.claim

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        claimed = claim(*args, **kwargs)
        claims.append(len(claimed))
        return claimed

    world.outbox.claim = counting  # type: ignore[method-assign]
    world.relay.wake.answer()  # as after a claim that took nothing
    world.relay.wake.feed()
    with ThreadPoolExecutor(1) as pool:
        assert world.relay._claim_into(pool) == 3
        assert claims == []
        world.relay.wake.set()
        assert world.relay._claim_into(pool) == 0
    assert claims == [0]
