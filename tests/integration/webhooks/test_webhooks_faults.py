"""Fault tests: real relay processes, a real subscriber process on 127.0.0.1, PostgreSQL.

The retry schedule is shrunk to 300 ms steps by settings so each test takes seconds.
"""

from __future__ import annotations

import argparse
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from tests.processes import Process, wait_until
from webhooks import publish
from webhooks.cli import add_commands
from webhooks.delivery import event_body
from webhooks.models import WebhookDelivery, WebhookSubscription
from webhooks.signing import signature_headers
from webhooks.subscriptions import SqlWebhookSubscriptions

from .conftest import Receiver, Relays

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TOPIC = "billing.usage_aggregated"
UNCAPPED = {"max_in_flight_per_subscription": 100}


def subscribe(sessions: sessionmaker[Session], receiver: Receiver, **fields) -> str:
    with sessions.begin() as session:
        subs = SqlWebhookSubscriptions(session)
        return subs.add(TOPIC, receiver.url, receiver.secret, **fields).id


def publish_many(sessions: sessionmaker[Session], count: int) -> list[str]:
    with sessions.begin() as session:
        return [
            publish(
                session,
                TOPIC,
                {"tenant_id": "t1", "metric": "tokens", "day_start": f"day-{i}", "total": i},
            )
            for i in range(count)
        ]


def relay_idle_and_listening(sessions: sessionmaker[Session]) -> bool:
    """True when a relay's connection sits in LISTEN and no other one is busy (the start-up run
    and the run its LISTEN triggered are over)."""
    query = text(
        "SELECT query LIKE 'LISTEN%' AS listen, state FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    with sessions() as session:
        rows = session.execute(query).all()
    return any(r.listen and r.state == "idle" for r in rows) and all(
        r.state == "idle" for r in rows
    )


def iter_true_twice(condition: Callable[[], bool]) -> Iterator[bool]:
    """Yields True once `condition` held on two looks in a row."""
    previous = False
    while True:
        current = condition()
        yield previous and current
        previous = current


def statuses(sessions: sessionmaker[Session]) -> Counter[str]:
    with sessions() as session:
        return Counter(session.scalars(select(WebhookDelivery.status)))


def test_a_subscriber_down_for_a_while_gets_every_event_once_in_retries(
    pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    subscribe(pg_sessions, receiver)
    relays.start(retry_schedule="300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms")
    ids = publish_many(pg_sessions, 20)

    def all_retried() -> bool:
        with pg_sessions() as session:
            attempts = session.scalars(select(WebhookDelivery.attempts)).all()
        return len(attempts) == 20 and min(attempts) >= 2

    wait_until(all_retried)  # the subscriber is down: attempts fail, are retried
    assert statuses(pg_sessions) == {"failed": 20}
    receiver.start()
    wait_until(lambda: statuses(pg_sessions) == {"delivered": 20})

    assert sorted(receiver.ids()) == sorted(ids)  # each once, all verified by standardwebhooks
    with pg_sessions() as session:
        assert min(session.scalars(select(WebhookDelivery.attempts))) >= 3


def test_500_until_the_last_attempt_is_dead_then_replay_delivers_it(
    pg_sessions, receiver: Receiver, relays: Relays, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.answer("500")
    receiver.start()
    subscribe(pg_sessions, receiver)
    relays.start(retry_schedule="200ms,200ms,200ms")
    [event_id] = publish_many(pg_sessions, 1)
    wait_until(lambda: statuses(pg_sessions) == {"dead": 1})
    with pg_sessions() as session:
        dead = session.scalars(select(WebhookDelivery)).one()
        assert (dead.attempts, dead.last_status_code) == (4, 500)
    assert receiver.ids() == []

    receiver.answer("ok")
    monkeypatch.setenv("DATABASE_URL", relays.database_url)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["webhooks", "replay", event_id])
    assert args.handler(args) == 0

    wait_until(lambda: statuses(pg_sessions) == {"delivered": 1})
    assert receiver.ids() == [event_id]


def test_two_relays_at_once_never_deliver_an_event_twice(
    pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    receiver.start()
    subscribe(pg_sessions, receiver)
    ids = publish_many(pg_sessions, 400)
    # One subscriber: lift the cap per subscription so both relays send at once.
    relays.start(user_agent="relay-a", batch_size=10, concurrency=4, **UNCAPPED)
    relays.start(user_agent="relay-b", batch_size=10, concurrency=4, **UNCAPPED)
    wait_until(lambda: statuses(pg_sessions) == {"delivered": 400}, timeout=40)

    received = receiver.received()
    assert sorted(r["id"] for r in received) == sorted(ids)
    assert {r["ua"] for r in received} == {"relay-a", "relay-b"}


def a_relay_mid_work(
    pg_sessions, receiver: Receiver, relays: Relays, events: int, concurrency: int, **settings
) -> tuple[list[str], Process]:
    """`events` published to a receiver that answers each after 0.4 s, and a relay started on
    them that has had `concurrency` of them received: their ids and the relay."""
    receiver.answer("slow")
    receiver.start()
    subscribe(pg_sessions, receiver)
    ids = publish_many(pg_sessions, events)
    relay = relays.start(concurrency=concurrency, **settings)
    wait_until(lambda: len(receiver.ids()) >= concurrency)
    return ids, relay


def test_a_relay_killed_mid_batch_loses_nothing(
    pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    ids, first = a_relay_mid_work(
        pg_sessions, receiver, relays, 24, 4, batch_size=8, claim_lease="2s"
    )
    first.signal(signal.SIGKILL)
    first.wait(10)
    assert statuses(pg_sessions)["delivered"] < 24

    receiver.answer("ok")
    relays.start(claim_lease="2s")
    wait_until(lambda: statuses(pg_sessions) == {"delivered": 24}, timeout=30)
    received = receiver.ids()
    assert set(received) == set(ids)  # a repeat, if any, carries the same webhook-id


def test_sigterm_finishes_what_is_in_flight_and_hands_back_the_rest(
    pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    ids, relay = a_relay_mid_work(
        pg_sessions, receiver, relays, 30, 3, batch_size=20, claim_lease="10m"
    )
    relay.signal(signal.SIGTERM)
    assert relay.wait(15) == 0

    with pg_sessions() as session:
        rows = session.scalars(select(WebhookDelivery)).all()
    now = datetime.now(UTC)
    delivered = {r.event_id for r in rows if r.status == "delivered"}
    assert delivered == set(receiver.ids())  # what was sent was recorded
    waiting = [r for r in rows if r.status != "delivered"]
    assert waiting  # the stop came mid-work
    assert all(r.attempts == 0 and r.next_attempt_at <= now for r in waiting)  # not held by a lease

    receiver.answer("ok")
    relays.start()
    wait_until(lambda: statuses(pg_sessions) == {"delivered": 30})
    assert sorted(receiver.ids()) == sorted(ids)  # nothing lost, nothing twice


def test_an_idle_relay_wakes_on_notify_long_before_its_poll(
    pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    receiver.start()
    subscribe(pg_sessions, receiver)
    relays.start(poll_interval=120)
    idle_twice = iter_true_twice(lambda: relay_idle_and_listening(pg_sessions))
    wait_until(lambda: next(idle_twice), timeout=60)
    [event_id] = publish_many(pg_sessions, 1)  # only a NOTIFY wakes it: its poll is 120 s away
    committed = time.time()
    wait_until(lambda: receiver.ids(), timeout=60)
    assert receiver.ids() == [event_id]
    assert receiver.received()[0]["at"] - committed < 60


def test_without_listen_the_relay_still_finds_events_by_polling(
    pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    receiver.start()
    subscribe(pg_sessions, receiver)
    relays.start(listen="false", poll_interval=0.3)
    ids = publish_many(pg_sessions, 3)
    wait_until(lambda: statuses(pg_sessions) == {"delivered": 3})
    assert sorted(receiver.ids()) == sorted(ids)


def test_a_relay_whose_database_connections_are_cut_goes_on_delivering(
    pg_engine, pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    """Its pool holds no ping: the first claim or recording on a dead connection fails, is
    retried on a fresh one, and every event arrives."""
    receiver.start()
    subscribe(pg_sessions, receiver)
    relays.start()
    first = publish_many(pg_sessions, 5)
    wait_until(lambda: statuses(pg_sessions) == {"delivered": 5})
    cut = text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    with pg_sessions() as session:
        assert session.scalar(cut)
    pg_engine.dispose()  # the test's own pooled connections were cut too
    second = publish_many(pg_sessions, 5)
    wait_until(lambda: statuses(pg_sessions) == {"delivered": 10})
    assert sorted(receiver.ids()) == sorted(first + second)


def test_410_gone_disables_the_subscription(
    pg_sessions, receiver: Receiver, relays: Relays
) -> None:
    receiver.answer("410")
    receiver.start()
    sub_id = subscribe(pg_sessions, receiver)
    relays.start()
    publish_many(pg_sessions, 1)
    wait_until(lambda: statuses(pg_sessions) == {"dead": 1})
    with pg_sessions() as session:
        sub = session.get(WebhookSubscription, sub_id)
        assert sub.enabled is False
        assert "410" in sub.disabled_reason


@pytest.mark.parametrize("fault", ["tampered body", "wrong secret", "old timestamp"])
def test_the_subscriber_rejects_forged_deliveries(receiver: Receiver, fault: str) -> None:
    receiver.start()
    body = event_body(TOPIC, {"tenant_id": "t1"}, datetime.now(UTC))
    secret = (
        "whsec_d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA==" if fault == "wrong secret" else receiver.secret
    )
    at = datetime.now(UTC) - (timedelta(minutes=10) if fault == "old timestamp" else timedelta())
    headers = signature_headers([secret], "evt_forged", int(at.timestamp()), body)
    sent = body.replace(b"t1", b"t2") if fault == "tampered body" else body
    response = httpx.post(receiver.url, content=sent, headers=headers)
    assert response.status_code == 400
    assert receiver.ids() == []


def test_billing_webhooks_listen_prints_what_the_relay_delivers(
    pg_sessions, relays: Relays, tmp_path
) -> None:
    import json
    import os
    import shutil
    import socket

    from tests.processes import free_port, start
    from webhooks.secrets import generate_secret

    port, secret = free_port(), generate_secret()
    billing = shutil.which("billing")
    assert billing is not None
    argv = [billing, "webhooks", "listen", "--secret", secret, "--port", str(port)]
    listen = start("listen", argv, dict(os.environ), tmp_path / "listen.out")

    def printed() -> list[dict]:
        text = listen.output()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    try:

        def accepting() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(accepting)
        with pg_sessions.begin() as session:
            SqlWebhookSubscriptions(session).add(TOPIC, f"http://127.0.0.1:{port}/hook", secret)
        relays.start()
        ids = publish_many(pg_sessions, 3)
        wait_until(lambda: len(printed()) >= 3)
        lines = printed()
        assert sorted(line["id"] for line in lines) == sorted(ids)
        assert {line["type"] for line in lines} == {TOPIC}
        assert sorted(line["data"]["total"] for line in lines) == [0, 1, 2]
    finally:
        listen.stop()
