"""One slow subscriber can't hold the relay: a total deadline per attempt, a cap per
subscription, and no delivery sent twice because its lease ran out while it waited."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from webhooks import publish
from webhooks.delivery import ClaimedDelivery, Sender, make_client
from webhooks.models import WebhookDelivery
from webhooks.policy import RetryPolicy
from webhooks.relay import Relay
from webhooks.settings import WebhookSettings, parse_schedule
from webhooks.ssrf import AddressPolicy
from webhooks.store import SqlDeliveryStore
from webhooks.subscriptions import SqlWebhookSubscriptions

from .test_webhooks_relay import run_relay_until

TOPIC = "billing.invoice.created"
LOOPBACK = AddressPolicy(allow_loopback=True)


class Drip(BaseHTTPRequestHandler):
    """Answers the headers one byte every 0.1 s, for as long as the client listens."""

    stop = threading.Event()
    in_flight: Counter[str] = Counter()
    most: Counter[str] = Counter()
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        with self.lock:
            self.in_flight[self.path] += 1
            self.most[self.path] = max(self.most[self.path], self.in_flight[self.path])
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            while not self.stop.wait(0.1):
                self.wfile.write(b"a")
                self.wfile.flush()
        except OSError:
            pass  # the relay hung up: what we want
        finally:
            with self.lock:
                self.in_flight[self.path] -= 1
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


class Healthy(BaseHTTPRequestHandler):
    arrived: list[float] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.arrived.append(time.monotonic())
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dripping() -> Iterator[str]:
    Drip.stop.clear()
    Drip.in_flight.clear()
    Drip.most.clear()
    yield from serve(Drip)
    Drip.stop.set()


@pytest.fixture
def healthy() -> Iterator[str]:
    Healthy.arrived = []
    yield from serve(Healthy)


def delivery(url: str) -> ClaimedDelivery:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    return ClaimedDelivery("d", "e", TOPIC, {}, datetime.now(UTC), "s", url, (secret,), 1)


def test_an_attempt_is_cut_off_at_its_total_deadline_however_it_drips(dripping) -> None:
    # Each byte comes well within the read timeout: only a total deadline ends the attempt.
    client = make_client(policy=LOOPBACK, connect_timeout=5, read_timeout=5, max_connections=2)
    sender = Sender(client, user_agent="t", attempt_timeout=0.5)
    started = time.monotonic()
    with client:
        outcome = sender.send(delivery(f"{dripping}/drip"))
    elapsed = time.monotonic() - started
    assert outcome.status_code is None
    assert "timeout" in (outcome.error or "")
    assert "attempt deadline 0.5 s" in (outcome.error or "")
    assert elapsed < 4  # the read timeout alone would never end it


def test_the_deadline_of_one_attempt_does_not_shorten_the_next(dripping, healthy) -> None:
    client = make_client(policy=LOOPBACK, connect_timeout=5, read_timeout=5, max_connections=2)
    sender = Sender(client, user_agent="t", attempt_timeout=0.3)
    with client:
        assert sender.send(delivery(f"{dripping}/drip")).status_code is None
        time.sleep(0.4)
        assert sender.send(delivery(f"{healthy}/ok")).status_code == 204


def test_twenty_dripping_subscribers_do_not_hold_a_healthy_ones_events(
    session_factory: sessionmaker[Session], dripping: str, healthy: str
) -> None:
    with session_factory.begin() as session:
        subs = SqlWebhookSubscriptions(session)
        for i in range(20):
            subs.add(TOPIC, f"{dripping}/drip/{i}", tenant_id=f"slow{i}")
        subs.add(TOPIC, f"{healthy}/ok", tenant_id="fine")
        for i in range(20):
            for _ in range(3):
                publish(session, TOPIC, {"tenant_id": f"slow{i}", "invoice_id": "i"})
    with session_factory.begin() as session:  # published last: behind 60 dripping deliveries
        fine = [publish(session, TOPIC, {"tenant_id": "fine", "invoice_id": "i"}) for _ in "abc"]

    client = make_client(policy=LOOPBACK, connect_timeout=5, read_timeout=5, max_connections=8)
    relay = Relay(
        SqlDeliveryStore(session_factory),
        Sender(client, user_agent="t"),
        RetryPolicy(schedule=parse_schedule("1h"), jitter=0.0),
        concurrency=8,
        poll_interval=0.05,
        attempt_timeout=1.0,
        max_in_flight_per_subscription=2,
        shutdown_timeout=3.0,
    )
    started = time.monotonic()
    try:
        run_relay_until(relay, lambda: len(Healthy.arrived) >= len(fine), timeout=30)
    finally:
        client.close()
    assert len(Healthy.arrived) == 3
    # 60 attempts of 1 s on 8 slots, the healthy events among the first of each round.
    assert max(Healthy.arrived) - started < 15
    assert max(Drip.most.values()) <= 2
    with session_factory() as session:
        states = Counter(session.scalars(select(WebhookDelivery.status)))
    assert states["delivered"] == 3


def test_a_delivery_whose_lease_ran_out_while_it_waited_is_handed_back_unsent(
    session_factory: sessionmaker[Session], healthy: str
) -> None:
    with session_factory.begin() as session:
        SqlWebhookSubscriptions(session).add(TOPIC, f"{healthy}/ok")
        publish(session, TOPIC, {"tenant_id": "t", "invoice_id": "i"})
    store = SqlDeliveryStore(session_factory)
    now = datetime.now(UTC)
    clock = [now]
    client = make_client(policy=LOOPBACK, connect_timeout=5, read_timeout=5, max_connections=2)
    relay = Relay(
        store,
        Sender(client, user_agent="t"),
        RetryPolicy(schedule=parse_schedule("1h")),
        lease=timedelta(minutes=5),
        now=lambda: clock[0],
    )
    [claimed] = store.claim(10, now, relay.lease)
    clock[0] = now + timedelta(minutes=4, seconds=56)  # 4 s left: under the margin
    with client:
        assert relay.attempt(claimed) is None
    assert Healthy.arrived == []
    with session_factory() as session:
        [row] = session.scalars(select(WebhookDelivery))
        assert (row.status, row.attempts, row.claimed_until) == ("pending", 0, None)


def test_an_attempt_never_outlives_its_claim(dripping) -> None:
    client = make_client(policy=LOOPBACK, connect_timeout=5, read_timeout=5, max_connections=2)
    now = datetime.now(UTC)

    class NoStore:
        def release(self, deliveries, now) -> None:
            raise AssertionError("nothing to hand back")

    relay = Relay(
        NoStore(),  # type: ignore[arg-type]
        Sender(client, user_agent="t"),
        RetryPolicy(schedule=parse_schedule("1h")),
        attempt_timeout=30,
        now=lambda: now,
    )
    claimed = delivery(f"{dripping}/drip")
    lease_end = now + timedelta(seconds=5.5)  # 0.5 s left once the margin is kept
    started = time.monotonic()
    with client:
        result = relay.attempt(replace(claimed, lease_ends_at=lease_end))
    assert result is not None
    assert "timeout" in (result.outcome.error or "")
    assert time.monotonic() - started < 4


def test_the_fairness_defaults() -> None:
    settings = WebhookSettings()
    assert (settings.attempt_timeout, settings.max_in_flight_per_subscription) == (30.0, 2)


def test_a_short_lease_shortens_the_attempt_rather_than_skip_it(healthy) -> None:
    client = make_client(policy=LOOPBACK, connect_timeout=5, read_timeout=5, max_connections=2)
    now = datetime.now(UTC)
    relay = Relay(
        None,  # type: ignore[arg-type]
        Sender(client, user_agent="t"),
        RetryPolicy(schedule=parse_schedule("1h")),
        lease=timedelta(seconds=3),
        now=lambda: now,
    )
    claimed = delivery(f"{healthy}/ok")
    lease_end = now + timedelta(seconds=3)
    with client:
        result = relay.attempt(replace(claimed, lease_ends_at=lease_end))
    assert result is not None
    assert result.outcome.status_code == 204


def test_settings_read_the_fairness_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKS_ATTEMPT_TIMEOUT", "12.5")
    monkeypatch.setenv("WEBHOOKS_MAX_IN_FLIGHT_PER_SUBSCRIPTION", "3")
    settings = WebhookSettings()
    relay = Relay.from_settings(
        settings, SqlDeliveryStore(sessionmaker()), Sender(None, user_agent="t")
    )  # type: ignore[arg-type]
    assert (relay.attempt_timeout, relay.max_in_flight_per_subscription) == (12.5, 3)
