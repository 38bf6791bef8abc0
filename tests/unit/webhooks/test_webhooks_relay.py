"""The relay over the in-memory stores, with `httpx.MockTransport` subscribers."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import standardwebhooks
from prometheus_client import REGISTRY

from webhooks import (
    InMemoryOutboxStore,
    InMemoryWebhookSubscriptions,
    WebhookService,
    WebhookVerificationError,
    verify,
)
from webhooks.delivery import ClaimedDelivery, DeliveryClient, Sender
from webhooks.interfaces import AttemptResult
from webhooks.policy import Outcome, RetryPolicy
from webhooks.relay import GATHER_TICK, Relay, log_attempt, report
from webhooks.settings import parse_schedule

TOPIC = "billing.usage_aggregated"
PAYLOAD = {
    "tenant_id": "t1",
    "metric": "tokens",
    "day_start": "2025-01-01T00:00:00+00:00",
    "total": 7,
}
URL = "https://subscriber.test/hook"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, the fewest allowed


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class World:
    """Stores, a service, a fake subscriber and a relay sharing one fake clock."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response], **relay_options) -> None:
        self.clock = Clock()
        self.requests: list[httpx.Request] = []

        def recording(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return handler(request)

        self.outbox = InMemoryOutboxStore()
        self.subs = InMemoryWebhookSubscriptions(now=self.clock)
        self.service = WebhookService(outbox=self.outbox, subs=self.subs, now=self.clock)
        client = DeliveryClient(httpx.MockTransport(recording))
        sender = Sender(client, user_agent="test", clock=lambda: self.clock.now.timestamp())
        options = {
            "disable_after": timedelta(days=5),
            "lease": timedelta(minutes=5),
            "now": self.clock,
            **relay_options,
        }
        policy = RetryPolicy(schedule=parse_schedule("5s,5m,30m"), jitter=0.0)
        self.relay = Relay(self.outbox, sender, options.pop("policy", policy), **options)

    def statuses(self) -> list[str]:
        return [d.status for d in self.outbox.deliveries()]


def answer(status: int, **headers: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, headers=headers)


def test_an_event_is_delivered_signed_and_marked_delivered() -> None:
    world = World(answer(204))
    sub = world.subs.add(TOPIC, url=URL, secret=SECRET)
    event_id = world.service.publish(TOPIC, PAYLOAD)

    assert world.relay.run_once() == 1

    [request] = world.requests
    assert str(request.url) == URL
    assert request.headers["webhook-id"] == event_id
    assert request.headers["webhook-timestamp"] == str(int(world.clock.now.timestamp()))
    body = standardwebhooks.Webhook(sub.secret).verify(request.content, dict(request.headers))
    assert body["type"] == TOPIC
    assert body["data"] == PAYLOAD
    [delivery] = world.outbox.deliveries()
    assert (delivery.status, delivery.attempts, delivery.delivered_at) == (
        "delivered",
        1,
        world.clock.now,
    )
    assert world.relay.run_once() == 0  # nothing is sent twice


def test_the_seed_quick_start_runs_as_written() -> None:
    outbox = InMemoryOutboxStore()
    subs = InMemoryWebhookSubscriptions()
    subs.add("billing.usage_aggregated", url="https://example.test/hook", secret=SECRET)
    webhooks = WebhookService(outbox=outbox, subs=subs)
    event_id = webhooks.publish("billing.usage_aggregated", PAYLOAD)
    assert [e.id for e in outbox.events()] == [event_id]
    assert [d.status for d in outbox.deliveries()] == ["pending"]


def test_in_memory_publish_of_one_event_id_twice_stores_it_once() -> None:
    world = World(answer(200))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD, event_id="e1")
    world.service.publish(TOPIC, PAYLOAD, event_id="e1")
    assert len(world.outbox.events()) == 1
    assert len(world.outbox.deliveries()) == 1


def test_a_failed_attempt_is_retried_after_the_scheduled_delay_with_the_same_id() -> None:
    answers = iter([500, 200])
    world = World(lambda request: httpx.Response(next(answers)))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)

    world.relay.run_once()
    [delivery] = world.outbox.deliveries()
    assert (delivery.status, delivery.last_status_code) == ("failed", 500)
    assert delivery.next_attempt_at == world.clock.now + timedelta(seconds=5)
    world.clock.advance(timedelta(seconds=4))
    assert world.relay.run_once() == 0  # not due yet
    world.clock.advance(timedelta(seconds=1))
    assert world.relay.run_once() == 1

    assert world.statuses() == ["delivered"]
    assert delivery.attempts == 2
    assert len({r.headers["webhook-id"] for r in world.requests}) == 1
    first, second = (r.headers["webhook-timestamp"] for r in world.requests)
    assert int(second) - int(first) == 5  # each attempt is signed at its own time


def test_after_the_last_attempt_the_delivery_is_dead() -> None:
    world = World(answer(500))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    for _ in range(4):
        assert world.relay.run_once() == 1
        world.clock.advance(timedelta(hours=1))
    assert world.relay.run_once() == 0
    assert world.statuses() == ["dead"]
    assert len(world.requests) == 4


def test_410_gone_disables_the_subscription_and_kills_its_deliveries() -> None:
    world = World(answer(410))
    sub = world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.batch_size = 1
    world.service.publish(TOPIC, PAYLOAD)

    assert world.relay.run_once() == 1
    assert sub.enabled is False
    assert "410" in (sub.disabled_reason or "")
    assert world.relay.run_once() == 0  # the other delivery waits for a re-enable
    assert world.statuses() == ["dead", "pending"]


def test_redirects_are_not_followed() -> None:
    world = World(answer(302, location="https://elsewhere.test/"))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    assert len(world.requests) == 1
    [delivery] = world.outbox.deliveries()
    assert delivery.status == "failed"
    assert "redirect to https://elsewhere.test/ not followed" in (delivery.last_error or "")


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(status: int) -> None:
    world = World(answer(status, **{"retry-after": "600"}))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    [delivery] = world.outbox.deliveries()
    assert delivery.next_attempt_at == world.clock.now + timedelta(seconds=600)


def test_retry_after_on_500_is_ignored() -> None:
    world = World(answer(500, **{"retry-after": "600"}))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    [delivery] = world.outbox.deliveries()
    assert delivery.next_attempt_at == world.clock.now + timedelta(seconds=5)


@pytest.mark.parametrize(
    ("error", "expected"),
    [(httpx.ConnectTimeout("slow"), "timeout"), (httpx.ConnectError("refused"), "ConnectError")],
)
def test_network_errors_are_recorded_and_retried(error: Exception, expected: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    world = World(fail)
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    [delivery] = world.outbox.deliveries()
    assert delivery.status == "failed"
    assert delivery.last_status_code is None
    assert expected in (delivery.last_error or "")


def test_the_error_text_keeps_the_start_of_the_answer() -> None:
    world = World(lambda request: httpx.Response(500, text="database on fire " * 100))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    [delivery] = world.outbox.deliveries()
    assert (delivery.last_error or "").startswith("HTTP 500: database on fire")
    assert len(delivery.last_error or "") <= 500


def test_a_subscription_failing_for_five_days_is_disabled_with_a_reason() -> None:
    world = World(answer(500))
    world.relay.policy = RetryPolicy(schedule=(timedelta(days=1),) * 10, jitter=0.0)
    sub = world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    started = world.clock.now
    for _ in range(5):
        world.relay.run_once()
        assert sub.enabled
        world.clock.advance(timedelta(days=1))
    world.relay.run_once()
    assert sub.enabled is False
    assert sub.failing_since == started
    assert f"failed since {started.isoformat()}" in (sub.disabled_reason or "")


def test_one_success_resets_the_failure_streak() -> None:
    answers = iter([500, 200, 500])
    world = World(lambda request: httpx.Response(next(answers)))
    sub = world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    assert sub.failing_since == world.clock.now
    world.clock.advance(timedelta(seconds=5))
    world.relay.run_once()
    assert sub.failing_since is None


def test_during_a_rotation_both_secrets_verify_and_afterwards_only_the_new_one() -> None:
    world = World(answer(200))
    sub = world.subs.add(TOPIC, url=URL)
    old = sub.secret
    new = world.subs.rotate_secret(sub.id, grace=timedelta(hours=24))
    assert new != old
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    during = world.requests[-1]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert standardwebhooks.Webhook(secret).verify(during.content, dict(during.headers))

    world.clock.advance(timedelta(hours=24))
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    after = world.requests[-1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert verify(after.content, after.headers, new, now=world.clock)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(after.content, after.headers, old, now=world.clock)


def test_disabled_and_enabled_subscriptions() -> None:
    world = World(answer(200))
    sub = world.subs.add(TOPIC, url=URL)
    world.subs.disable(sub.id)
    world.service.publish(TOPIC, PAYLOAD)
    assert world.outbox.deliveries() == []
    world.subs.enable(sub.id)
    world.service.publish(TOPIC, PAYLOAD)
    assert world.relay.run_once() == 1


class InFlight:
    """A subscriber holding each request until `release_at` are in flight at once (or `wait`
    seconds pass); `most` is the most it saw at once."""

    def __init__(self, release_at: int, wait: float) -> None:
        self.release_at, self.wait = release_at, wait
        self.in_flight = self.most = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            if self.in_flight >= self.release_at:
                self.release.set()
        self.release.wait(self.wait)
        with self.lock:
            self.in_flight -= 1
        return httpx.Response(200)


def test_run_delivers_everything_with_several_in_flight_then_stops() -> None:
    slow = InFlight(release_at=4, wait=5)
    world = World(
        slow, concurrency=4, batch_size=3, poll_interval=0.01, max_in_flight_per_subscription=None
    )
    world.subs.add(TOPIC, url=URL)
    ids = [world.service.publish(TOPIC, PAYLOAD) for _ in range(20)]
    run_relay_until(world.relay, lambda: world.statuses().count("delivered") == 20)
    assert world.statuses() == ["delivered"] * 20
    assert sorted(r.headers["webhook-id"] for r in world.requests) == sorted(ids)
    assert slow.most == 4


class Blocking:
    """A subscriber that answers 200 once `finish` is set (or `wait` seconds pass); `started`
    is set by the first request."""

    def __init__(self, wait: float = 5) -> None:
        self.started, self.finish, self.wait = threading.Event(), threading.Event(), wait

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.started.set()
        self.finish.wait(self.wait)
        return httpx.Response(200)


def test_stopping_finishes_requests_in_flight_and_hands_back_the_rest() -> None:
    blocking = Blocking()
    started, finish = blocking.started, blocking.finish
    world = World(blocking, concurrency=1, batch_size=5, poll_interval=0.01)
    world.subs.add(TOPIC, url=URL)
    for _ in range(3):
        world.service.publish(TOPIC, PAYLOAD)
    stop = threading.Event()
    thread = threading.Thread(target=world.relay.run, args=(stop,))
    thread.start()
    assert started.wait(5)
    stop.set()
    world.relay.wake.set()
    threading.Timer(0.1, finish.set).start()
    thread.join(5)

    assert not thread.is_alive()
    assert len(world.requests) == 1
    assert sorted(world.statuses()) == ["delivered", "pending", "pending"]
    for delivery in world.outbox.deliveries():
        if delivery.status == "pending":
            assert delivery.attempts == 0  # handed back uncounted, due at once
            assert delivery.next_attempt_at <= world.clock.now


def test_an_outcome_queued_while_the_recorder_stops_is_still_recorded() -> None:
    """At shutdown the recorder may time out on its queue just before an attempt's done
    callback queues the outcome (the callback runs after `wait` has already returned); that
    outcome is recorded, not dropped. The interleaving is forced: the recorder's queue gives
    nothing until the recorder is told to stop, then times out once after the callback ran."""
    world = World(answer(200), concurrency=1)
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    relay = world.relay
    called_back = threading.Event()
    recorder_stops: list[threading.Event] = []
    record_until, finished = relay._record_until, relay._finished

    def recording_until(stop: threading.Event) -> None:
        recorder_stops.append(stop)
        record_until(stop)

    def finished_then_tell(future: Future[AttemptResult | None]) -> None:
        finished(future)
        called_back.set()

    class LateQueue(queue.Queue[AttemptResult]):
        late = True

        def get(self, block: bool = True, timeout: float | None = None) -> AttemptResult:
            if self.late:
                if recorder_stops[0].wait(timeout or 0):
                    assert called_back.wait(5)
                    self.late = False
                raise queue.Empty
            return super().get(block, timeout)

    relay._record_until = recording_until  # type: ignore[method-assign]
    relay._finished = finished_then_tell  # type: ignore[method-assign]
    relay._done = LateQueue()
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    assert called_back.wait(5)
    stop.set()
    relay.wake.set()
    thread.join(5)

    assert not thread.is_alive()
    assert len(world.requests) == 1
    assert world.statuses() == ["delivered"]


class Flaky:
    """Wraps a store; the first call of each listed method raises, as a database outage would."""

    def __init__(self, store, *failing: str) -> None:
        self.store = store
        self.failing = set(failing)

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        def call(*args, **kwargs):
            if name in self.failing:
                self.failing.discard(name)
                raise ConnectionError(f"{name}: database unreachable")
            return method(*args, **kwargs)

        return call


def run_relay_until(
    relay: Relay,
    done: Callable[[], object],
    stop: threading.Event | None = None,
    timeout: float = 20.0,
) -> None:
    """Run `relay` in a thread until `done()` holds (polled, for `timeout` seconds at most),
    then stop it (`stop`, set by the caller too if given); it must have stopped."""
    stop = stop or threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline:
            threading.Event().wait(0.01)
    finally:
        stop.set()
        relay.wake.set()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize("failing", ["claim", "record"])
def test_the_relay_rides_out_a_database_error(failing: str, caplog) -> None:
    world = World(answer(200), poll_interval=0.02)
    world.relay.store = store = Flaky(world.outbox, failing)
    world.subs.add(TOPIC, url=URL)
    ids = [world.service.publish(TOPIC, PAYLOAD) for _ in range(5)]
    run_relay_until(
        world.relay, lambda: not store.failing and world.statuses() == ["delivered"] * 5
    )
    assert world.statuses() == ["delivered"] * 5
    assert sorted(r.headers["webhook-id"] for r in world.requests) == sorted(ids)
    assert f"{failing}: database unreachable" in caplog.text
    if failing == "claim":
        assert "claiming deliveries failed; retrying in 0.0s" in [
            r.getMessage() for r in caplog.records
        ]


def test_each_attempt_is_logged_and_counted_once_by_the_recorder_not_its_sender(caplog) -> None:
    """The senders go on to their next request; the recorder logs and counts each outcome
    before recording it, once, even when a recording fails and is tried again (and those of
    the recordings after it too)."""
    world = World(answer(200), poll_interval=0.02)
    world.relay.store = store = Flaky(world.outbox, "record")
    world.subs.add(TOPIC, url=URL)
    ids = [world.service.publish(TOPIC, PAYLOAD) for _ in range(5)]
    counted = {"outcome": "delivered"}
    delivered = REGISTRY.get_sample_value("webhooks_deliveries_total", counted) or 0.0

    def all_delivered() -> bool:
        statuses = world.statuses()
        if statuses == ["delivered"] * 5:  # recorded: the next ones are recorded apart
            ids.extend(world.service.publish(TOPIC, PAYLOAD) for _ in range(2))
        return statuses == ["delivered"] * 7

    with caplog.at_level("INFO", logger="webhooks.relay"):
        run_relay_until(world.relay, all_delivered)
    lines = [r for r in caplog.records if r.getMessage().startswith("webhook delivered in ")]
    assert not store.failing
    assert sorted(r.__dict__["event_id"] for r in lines) == sorted(ids)
    assert {r.threadName for r in lines} == {"webhook-record"}
    assert REGISTRY.get_sample_value("webhooks_deliveries_total", counted) == delivered + 7


def test_an_outcome_that_cannot_be_logged_is_recorded_and_the_next_ones_too(
    caplog, monkeypatch
) -> None:
    """The recorder's thread outlives a failure to count or log an outcome: had it died, no
    outcome would be recorded again (each delivery re-sent when its lease ran out)."""
    world = World(answer(200), poll_interval=0.02)
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    real_log_attempt = log_attempt
    failed: list[str] = []

    def failing_once(result: AttemptResult, outcome: str, seconds: float) -> None:
        if not failed:
            failed.append(result.delivery.delivery_id)
            raise ValueError("a log handler failed")
        real_log_attempt(result, outcome, seconds)

    monkeypatch.setattr("webhooks.relay.log_attempt", failing_once)

    def all_delivered() -> bool:
        if world.statuses() == ["delivered"]:  # recorded: the next ones come after it
            world.service.publish(TOPIC, PAYLOAD)
            world.service.publish(TOPIC, PAYLOAD)
        return world.statuses() == ["delivered"] * 3

    run_relay_until(world.relay, all_delivered)
    assert world.statuses() == ["delivered"] * 3
    assert len(world.requests) == 3  # none sent twice
    messages = [record.getMessage() for record in caplog.records]
    assert f"counting or logging delivery {failed[0]} failed" in messages


def test_an_idle_relay_rides_out_a_database_error(caplog) -> None:
    world = World(answer(200), poll_interval=0.02)
    world.relay.store = store = Flaky(world.outbox, "next_due")
    world.subs.add(TOPIC, url=URL)
    run_relay_until(world.relay, lambda: not store.failing)
    world.relay.store = world.outbox
    world.service.publish(TOPIC, PAYLOAD)
    run_relay_until(world.relay, lambda: world.statuses() == ["delivered"])
    assert world.statuses() == ["delivered"]
    assert "next_due: database unreachable" in caplog.text
    assert "looking for due deliveries failed" in [r.getMessage() for r in caplog.records]


def test_retry_after_as_an_http_date_is_read_against_the_relays_clock() -> None:
    from email.utils import format_datetime

    when: list[datetime] = []
    world = World(
        lambda request: httpx.Response(
            503, headers={"retry-after": format_datetime(when[0], usegmt=True)}
        )
    )
    when.append(world.clock.now + timedelta(minutes=7))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.relay.run_once()
    [delivery] = world.outbox.deliveries()
    assert delivery.next_attempt_at == when[0]


def test_a_stopping_relay_records_every_finished_outcome_even_after_a_failed_write() -> None:
    blocking = Blocking()
    started, finish = blocking.started, blocking.finish
    world = World(blocking, concurrency=2, poll_interval=0.01)
    world.relay.store = store = Flaky(world.outbox, "record")
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    stop = threading.Event()
    thread = threading.Thread(target=world.relay.run, args=(stop,))
    thread.start()
    assert started.wait(5)
    stop.set()  # the outcome arrives after the stop, and its first write fails
    world.relay.wake.set()
    finish.set()
    thread.join(10)
    assert not thread.is_alive()
    assert not store.failing
    assert world.statuses() == ["delivered"]


class NoWaiting(queue.SimpleQueue[AttemptResult]):
    """A queue of outcomes that fails the test if the recorder blocks on it."""

    def get(self, block: bool = True, timeout: float | None = None) -> AttemptResult:
        if block:
            raise AssertionError(f"the recorder waited {timeout} s for more outcomes")
        return super().get(block=False)


def test_with_no_attempt_running_the_recorder_takes_what_is_queued_without_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscription at its cap has its few outcomes recorded at once (freeing its slots),
    not after the gathering window: nothing else is coming."""
    monkeypatch.setattr("webhooks.relay.RECORD_EVERY", 3600.0)
    relay = World(answer(200)).relay
    relay._done = NoWaiting()
    first, second, third = (object() for _ in range(3))
    relay._done.put(second)  # type: ignore[arg-type]
    relay._done.put(third)  # type: ignore[arg-type]
    done: Future[AttemptResult | None] = Future()
    done.set_result(None)
    relay._in_flight[done] = None  # type: ignore[assignment]  # finished, not yet forgotten
    pending = [first]
    relay._gather(pending, threading.Event())  # type: ignore[arg-type]
    assert pending == [first, second, third]


def test_while_an_attempt_runs_the_recorder_waits_for_its_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outcomes of attempts still running go into the same transaction (up to the window)."""
    monkeypatch.setattr("webhooks.relay.RECORD_EVERY", 3600.0)
    relay = World(answer(200)).relay
    running: Future[AttemptResult | None] = Future()
    relay._in_flight[running] = None  # type: ignore[assignment]
    first, late = object(), object()

    def finish() -> None:  # as a chain's task ends: its outcome queued, then its future done
        relay._done.put(late)  # type: ignore[arg-type]
        running.set_result(None)

    threading.Timer(0.05, finish).start()
    pending = [first]
    relay._gather(pending, threading.Event())  # type: ignore[arg-type]
    assert pending == [first, late]


def test_a_relay_from_settings_takes_every_setting() -> None:
    from webhooks.settings import WebhookSettings

    settings = WebhookSettings(
        retry_schedule="1s,2m",
        jitter=0.1,
        retry_after_max=timedelta(hours=2),
        concurrency=3,
        batch_size=7,
        claim_lease=timedelta(minutes=9),
        poll_interval=0.25,
        disable_after=timedelta(days=2),
        shutdown_timeout=4.0,
        attempt_timeout=11.0,
        max_in_flight_per_subscription=5,
    )
    world = World(answer(200))
    relay = Relay.from_settings(settings, world.outbox, world.relay.sender)
    assert relay.policy == RetryPolicy(
        schedule=(timedelta(seconds=1), timedelta(minutes=2)),
        jitter=0.1,
        retry_after_max=timedelta(hours=2),
    )
    assert (relay.concurrency, relay.batch_size, relay.lease, relay.poll_interval) == (
        3,
        7,
        timedelta(minutes=9),
        0.25,
    )
    assert (relay.disable_after, relay.shutdown_timeout, relay.attempt_timeout) == (
        timedelta(days=2),
        4.0,
        11.0,
    )
    assert relay.max_in_flight_per_subscription == 5


def test_run_once_keeps_at_most_concurrency_requests_in_flight() -> None:
    """Two deliveries, one slot: the first request waits (half a second at most) for a second
    one to arrive beside it; one never does."""
    overlapping = InFlight(release_at=2, wait=0.5)
    world = World(overlapping, concurrency=1, max_in_flight_per_subscription=None)
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.service.publish(TOPIC, PAYLOAD)
    assert world.relay.run_once() == 2
    assert overlapping.most == 1
    assert world.statuses() == ["delivered", "delivered"]


def test_a_failed_hand_back_is_logged_with_its_count(caplog) -> None:
    world = World(answer(200))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    [claimed] = world.outbox.claim(10, world.clock.now, world.relay.lease)
    world.relay.store = store = Flaky(world.outbox, "release")
    world.clock.advance(world.relay.lease)  # the lease ran out while it waited for a slot
    with caplog.at_level("ERROR", logger="webhooks.relay"):
        assert world.relay.attempt(claimed) is None
    assert not store.failing
    assert world.requests == []
    [record] = [r for r in caplog.records if r.name == "webhooks.relay"]
    assert record.getMessage() == "handing back 1 claimed deliveries failed"


def test_the_log_line_lists_the_fields_as_key_value_pairs(caplog) -> None:
    world = World(answer(503))
    sub = world.subs.add(TOPIC, url=URL)
    event_id = world.service.publish(TOPIC, PAYLOAD)
    [delivery] = world.outbox.deliveries()
    with caplog.at_level("INFO", logger="webhooks.relay"):
        world.relay.run_once()
    [record] = [r for r in caplog.records if r.name == "webhooks.relay"]
    fields = record.getMessage().split(": ", 1)[1]
    retry_at = (world.clock.now + timedelta(seconds=5)).isoformat()
    assert fields == (
        f"event_id={event_id} subscription_id={sub.id} tenant_id=t1 "
        f"delivery_id={delivery.id} attempt=1 status_code=503 error='HTTP 503' "
        f"next_attempt_at={retry_at}"
    )


def test_a_chains_task_queues_its_outcomes_before_it_ends() -> None:
    """A chain's task queues each outcome itself, before its future is done: a stopping
    recorder that finds the queue empty once the tasks are done has missed none."""
    world = World(answer(200))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    world.service.publish(TOPIC, PAYLOAD)
    relay = world.relay
    claimed = world.outbox.claim(10, world.clock.now, relay.lease, 1, chain=2)
    [head] = relay._chain_heads(claimed)
    with ThreadPoolExecutor(max_workers=1) as pool, relay._lock:
        task = relay._start(pool, head)
    task.result()
    stop = threading.Event()
    stop.set()
    relay._record_until(stop)
    assert world.statuses() == ["delivered", "delivered"]


def test_the_relays_threads_are_named_for_what_they_do() -> None:
    senders: set[str] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        senders.add(threading.current_thread().name.rsplit("_", 1)[0])
        return httpx.Response(200)

    world = World(handler, poll_interval=0.01)
    recorders: set[str] = set()
    record = world.outbox.record

    def recording(*args, **kwargs):
        recorders.add(threading.current_thread().name)
        return record(*args, **kwargs)

    world.outbox.record = recording  # type: ignore[method-assign]
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    run_relay_until(world.relay, lambda: world.statuses() == ["delivered"])
    assert (senders, recorders) == ({"webhook-send"}, {"webhook-record"})


def test_an_attempt_that_raises_is_logged_and_leaves_nothing_to_record(caplog) -> None:
    """A bug in an attempt: logged; the delivery stays claimed until its lease ends, and the
    recorder is handed no outcome for it."""

    class Broken:
        def send(self, delivery, timeout):
            raise RuntimeError("a bug")

    world = World(answer(200), poll_interval=0.01)
    world.relay.sender = Broken()  # type: ignore[assignment]
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "webhooks.relay"]

    with caplog.at_level("ERROR", logger="webhooks.relay"):
        run_relay_until(world.relay, lambda: messages())
    assert messages() == ["a delivery attempt failed unexpectedly"]
    [record] = [r for r in caplog.records if r.name == "webhooks.relay"]
    assert record.exc_info is not None
    assert repr(record.exc_info[1]) == "RuntimeError('a bug')"  # the traceback is logged too
    assert world.statuses() == ["pending"]


def test_a_stop_waits_for_requests_in_flight_at_most_the_shutdown_timeout(caplog) -> None:
    blocking = Blocking(wait=10)
    started, finish = blocking.started, blocking.finish
    world = World(blocking, concurrency=1, poll_interval=0.01, shutdown_timeout=0.2)
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    stop = threading.Event()
    thread = threading.Thread(target=world.relay.run, args=(stop,))
    thread.start()
    try:
        assert started.wait(5)
        with caplog.at_level("INFO", logger="webhooks.relay"):
            stop.set()
            world.relay.wake.set()
            thread.join(5)
        assert not thread.is_alive()  # it gave up on the request still running
    finally:
        finish.set()
        thread.join(5)
    assert "waiting for 1 deliveries in flight" in [r.getMessage() for r in caplog.records]
    assert world.statuses() == ["pending"]  # claimed: another relay sends it after the lease


def test_an_idle_relay_waits_until_the_next_delivery_is_due_within_the_poll_interval() -> None:
    world = World(answer(200), poll_interval=5.0)
    relay = world.relay
    assert relay._idle_wait() == 5.0  # nothing due: the poll interval
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)  # due now
    assert relay._idle_wait() == 0.001  # at once (the floor, not a busy loop)
    world.clock.advance(timedelta(seconds=-2))  # due in 2 s
    assert relay._idle_wait() == 2.0
    running: Future[AttemptResult | None] = Future()
    relay._in_flight[running] = None  # type: ignore[assignment]
    assert relay._idle_wait() == 5.0  # a finished request or its recording wakes it


def test_the_recorder_gathers_at_most_a_batch_per_transaction() -> None:
    relay = World(answer(200), batch_size=2).relay
    first, second, third = (object() for _ in range(3))
    relay._done.put(second)  # type: ignore[arg-type]
    relay._done.put(third)  # type: ignore[arg-type]
    pending = [first]
    relay._gather(pending, threading.Event())  # type: ignore[arg-type]
    assert pending == [first, second]


def test_a_claim_tops_up_to_concurrency_plus_a_batch_and_waits_above_the_refill_mark() -> None:
    """With 2 slots and batches of 2, 1 in flight: 3 more are claimed (and a full claim means
    more may be due); at 4 in flight (above 2 + 2 // 2) none; a failed claim claims none."""
    release = threading.Event()
    world = World(
        lambda request: httpx.Response(200) if release.wait(10) else httpx.Response(500),
        concurrency=2,
        batch_size=2,
        max_in_flight_per_subscription=None,
    )
    world.subs.add(TOPIC, url=URL)
    for _ in range(10):
        world.service.publish(TOPIC, PAYLOAD)
    relay = world.relay
    running: Future[AttemptResult | None] = Future()
    relay._in_flight[running] = None  # type: ignore[assignment]
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        assert relay._claim_into(pool) == 3
        assert relay._more_due
        assert relay._in_flight_count() == 4
        assert relay._claim_into(pool) == 0
        relay._in_flight.pop(running)
        relay.store = Flaky(world.outbox, "claim")
        assert relay._claim_into(pool) == 0  # 3 in flight, at the mark: it tries, and fails
        assert relay._claim_into(pool) == 1  # the next try claims the one wanted
        assert relay._in_flight_count() == 4
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert len(world.requests) == 4  # sent: the outcomes are the recorder's to write


def test_an_attempt_is_logged_with_its_duration_in_milliseconds_and_a_dead_one_warns(
    caplog,
) -> None:
    world = World(answer(200))
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    [claimed] = world.outbox.claim(10, world.clock.now, world.relay.lease)
    with caplog.at_level("INFO", logger="webhooks.relay"):
        result = world.relay.attempt(claimed)
        assert result is not None
        report([result])
        log_attempt(result, "delivered", 0.01234)
        log_attempt(result, "dead", 0.01234)
    measured, given, dead = [r for r in caplog.records if r.name == "webhooks.relay"]
    assert 0 < result.duration < 60  # this attempt's own time
    assert measured.duration_ms == round(result.duration * 1000, 1)
    assert (given.duration_ms, given.levelname) == (12.3, "INFO")
    assert given.getMessage().startswith("webhook delivered in 12.3 ms: event_id=")
    assert (dead.outcome, dead.levelname) == ("dead", "WARNING")


class FailingRecords:
    """A store whose `record` fails its first `failures` calls; counts the calls."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.recorded = failures, 0, []

    def record(self, results, now, disable_after) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("database unreachable")
        self.recorded.extend(results)


def an_outcome(delivery_id: str = "d", slot: str | None = None) -> AttemptResult:
    """A successful first attempt of a delivery claimed in `slot` (None: a slot of its own)."""
    at = datetime.now(UTC)
    claimed = ClaimedDelivery(
        delivery_id, "e", TOPIC, PAYLOAD, at, "s", URL, (SECRET,), 1, slot=slot
    )
    ok = Outcome(status_code=200)
    policy = RetryPolicy(schedule=(timedelta(seconds=5),))
    return AttemptResult(claimed, ok, policy.decide(1, ok, at))


@pytest.mark.parametrize(("failures", "calls", "recorded"), [(2, 3, 1), (1000, 3, 0)])
def test_a_stopping_recorder_tries_a_failing_write_three_times(
    caplog, failures: int, calls: int, recorded: int
) -> None:
    relay = World(answer(200), poll_interval=5.0).relay
    relay.store = store = FailingRecords(failures)  # type: ignore[assignment]
    relay._done.put(an_outcome())
    stop = threading.Event()
    stop.set()
    recorder = threading.Thread(target=relay._record_until, args=(stop,))
    with caplog.at_level("ERROR", logger="webhooks.relay"):
        recorder.start()
        recorder.join(10)
    assert not recorder.is_alive()
    assert (store.calls, len(store.recorded)) == (calls, recorded)
    assert [r.getMessage() for r in caplog.records] == [
        "recording 1 outcomes failed; will retry"
    ] * min(failures, calls)


@pytest.mark.parametrize(
    ("lease", "margin"),
    [(timedelta(minutes=5), timedelta(seconds=5)), (timedelta(seconds=20), timedelta(seconds=2))],
)
def test_a_delivery_left_with_only_the_margin_of_its_lease_is_handed_back_unsent(
    lease: timedelta, margin: timedelta
) -> None:
    """The margin is 5 s, or a tenth of the lease when shorter; with no more than it left, the
    attempt is not sent (its outcome could not be recorded before another relay claims it)."""
    world = World(answer(200), lease=lease)
    world.subs.add(TOPIC, url=URL)
    world.service.publish(TOPIC, PAYLOAD)
    [claimed] = world.outbox.claim(10, world.clock.now, lease)
    world.clock.advance(lease - margin - timedelta(milliseconds=1))
    assert world.relay.attempt(claimed) is not None  # a millisecond more than the margin: sent
    [claimed] = world.outbox.claim(10, world.clock.now + timedelta(minutes=1), lease)
    world.clock.now = claimed.lease_ends_at - margin
    assert world.relay.attempt(claimed) is None
    assert len(world.requests) == 1


class Waits(threading.Event):
    """A set stop event that notes how long each `wait` was asked to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.set()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return super().wait(timeout)


class NotedWaits(queue.SimpleQueue[AttemptResult]):
    """Outcomes that note the timeout of each blocking `get`."""

    def __init__(self) -> None:
        self.waits: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> AttemptResult:
        if block:
            self.waits.append(timeout)
        return super().get(block, timeout)


def test_an_idle_recorder_looks_for_outcomes_and_its_stop_every_50_ms() -> None:
    relay = World(answer(200)).relay
    relay._done = outcomes = NotedWaits()
    relay._record_until(Waits())
    assert outcomes.waits == [0.05]


def test_after_a_failed_write_the_recorder_waits_a_second_or_the_poll_interval_if_shorter() -> None:
    for poll_interval, wait in [(5.0, 1.0), (0.25, 0.25)]:
        relay = World(answer(200), poll_interval=poll_interval).relay
        relay.store = FailingRecords(1)  # type: ignore[assignment]
        relay._done.put(an_outcome())
        stop = Waits()
        relay._record_until(stop)
        assert stop.timeouts == [wait]


def test_a_write_that_succeeds_gives_the_next_failing_write_three_tries_again() -> None:
    """The first outcome's write fails once, then succeeds; a second outcome, queued then,
    fails every time, and a stopping recorder still tries it three times before it gives up."""
    relay = World(answer(200)).relay
    first, second = an_outcome("first"), an_outcome("second")

    class SecondWriteSucceeds(FailingRecords):
        def record(self, results, now, disable_after) -> None:
            self.calls += 1
            if self.calls != 2:
                raise ConnectionError("database unreachable")
            self.recorded.extend(results)
            relay._done.put(second)

    relay.store = store = SecondWriteSucceeds(0)  # type: ignore[assignment]
    relay._done.put(first)
    relay._record_until(Waits())
    assert (store.calls, store.recorded) == (5, [first])


def test_at_the_refill_mark_the_relay_claims_again_without_waiting() -> None:
    """1 slot, batches of 2: the mark is 1 + 2 // 2 = 2. The first claim finds 2 deliveries
    (3 more are published just after it); with 2 in flight, at the mark, not above it, the
    relay claims again at once, while the first request is still held (no request finished,
    no recording, no poll: the poll interval is longer than the test)."""
    held = Blocking(wait=10)
    world = World(
        held,
        concurrency=1,
        batch_size=2,
        poll_interval=600,
        max_in_flight_per_subscription=None,
        shutdown_timeout=10,
    )
    world.subs.add(TOPIC, url=URL)
    for _ in range(2):
        world.service.publish(TOPIC, PAYLOAD)
    claims: list[int] = []
    claim = world.outbox.claim

    def claiming(*args, **kwargs):
        claimed = claim(*args, **kwargs)
        if not claims:
            for _ in range(3):
                world.service.publish(TOPIC, PAYLOAD)
        claims.append(len(claimed))
        return claimed

    world.outbox.claim = claiming  # type: ignore[method-assign]

    def claimed_all_while_held() -> bool:
        if sum(claims) < 3:
            return False
        held.finish.set()
        return True

    run_relay_until(world.relay, claimed_all_while_held)
    assert claims[:2] == [2, 1]


def test_a_relay_without_options_has_the_settings_defaults() -> None:
    from webhooks.settings import WebhookSettings

    world = World(answer(200))
    bare = Relay(world.outbox, world.relay.sender, world.relay.policy)
    configured = Relay.from_settings(
        WebhookSettings.model_construct(), world.outbox, world.relay.sender
    )
    names = [
        "concurrency",
        "batch_size",
        "lease",
        "poll_interval",
        "disable_after",
        "shutdown_timeout",
        "attempt_timeout",
        "max_in_flight_per_subscription",
    ]
    assert [getattr(bare, name) for name in names] == [getattr(configured, n) for n in names]


class NotedStop(threading.Event):
    """A recorder's stop that notes each `wait`, runs `on_wait` at the first, and is set at
    the `stop_at`-th (a mutant that never stops gathering ends)."""

    def __init__(self, on_wait: Callable[[], None] = lambda: None, stop_at: int = 20) -> None:
        super().__init__()
        self.on_wait, self.stop_at = on_wait, stop_at
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        if len(self.timeouts) == 1:
            self.on_wait()
        if len(self.timeouts) >= self.stop_at:
            self.set()
        return self.is_set()


def gathering(batch_size: int = 100) -> tuple[Relay, Future[AttemptResult | None]]:
    relay = World(answer(200), batch_size=batch_size).relay
    running: Future[AttemptResult | None] = Future()
    relay._in_flight[running] = None  # type: ignore[assignment]
    return relay, running


def test_while_an_attempt_runs_the_recorder_takes_outcomes_every_gather_tick() -> None:
    relay, running = gathering()
    first, late = object(), object()

    def finish() -> None:  # as a chain's task ends: its outcome queued, then its future done
        relay._done.put(late)  # type: ignore[arg-type]
        running.set_result(None)

    stop = NotedStop(finish)
    pending = [first]
    relay._gather(pending, stop)  # type: ignore[arg-type]
    assert pending == [first, late]
    assert stop.timeouts == [GATHER_TICK]


def test_a_full_batch_is_recorded_without_waiting_for_the_attempts_still_running() -> None:
    relay, _ = gathering(batch_size=2)
    first, second = object(), object()
    relay._done.put(second)  # type: ignore[arg-type]
    stop = NotedStop()
    pending = [first]
    relay._gather(pending, stop)  # type: ignore[arg-type]
    assert pending == [first, second]
    assert stop.timeouts == []


def test_the_recorder_stops_gathering_at_the_end_of_its_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("webhooks.relay.RECORD_EVERY", 0.0)
    relay, _ = gathering()
    stop = NotedStop()
    pending = [object()]
    relay._gather(pending, stop)  # type: ignore[arg-type]
    assert stop.timeouts == []  # the window is over: what is queued is recorded now


def test_a_finished_task_wakes_the_relay_when_the_claimed_fall_to_the_mark_and_more_are_due() -> (
    None
):
    """1 slot, batches of 2: the mark is 2. A task that finishes leaving 2 claimed wakes the
    relay to claim again, if its last claim was full (more due); not above the mark, not
    after a claim that was not full, not for a task cancelled at a stop."""
    relay = World(answer(200), concurrency=1, batch_size=2).relay

    def woken(more_due: bool, tasks: int, cancelled: bool = False) -> bool:
        relay._more_due = more_due
        futures: list[Future[None]] = [Future() for _ in range(tasks)]
        for future in futures:
            relay._in_flight[future] = None  # type: ignore[assignment]
        if cancelled:
            futures[0].cancel()
        else:
            futures[0].set_result(None)
        relay.wake.clear()
        relay._finished(futures[0])
        relay._in_flight.clear()
        return relay.wake.is_set()

    assert woken(more_due=True, tasks=3)
    assert not woken(more_due=True, tasks=4)
    assert not woken(more_due=False, tasks=3)
    assert not woken(more_due=True, tasks=3, cancelled=True)


def test_run_once_claims_no_chains_and_keeps_a_subscription_to_its_cap() -> None:
    world = World(answer(200), max_in_flight_per_subscription=1)
    world.subs.add(TOPIC, url=URL)
    for _ in range(3):
        world.service.publish(TOPIC, PAYLOAD)
    assert world.relay.run_once() == 1
    assert sorted(world.statuses()) == ["delivered", "pending", "pending"]
