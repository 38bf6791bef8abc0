"""Webhook metrics: attempts by outcome, latencies, the per-attempt log line, the outbox gauges
read from the database, the multi-process exposition and the relay's metrics port."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from tests.processes import accepting_receiver, free_port, wait_until
from webhooks import InMemoryOutboxStore, InMemoryWebhookSubscriptions, WebhookService, publish
from webhooks.background import start_relay
from webhooks.delivery import DeliveryClient, Sender, make_client
from webhooks.metrics import OutboxCollector, render
from webhooks.models import WebhookDelivery
from webhooks.policy import RetryPolicy
from webhooks.relay import Relay
from webhooks.settings import WebhookSettings, parse_schedule
from webhooks.ssrf import AddressPolicy
from webhooks.subscriptions import SqlWebhookSubscriptions

TOPIC = "billing.usage_aggregated"
PAYLOAD = {"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01T00:00:00+00:00"}
T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def outcomes() -> dict[str, float]:
    names = ("delivered", "failed", "refused", "gone", "dead")
    return {o: sample("webhooks_deliveries_total", outcome=o) for o in names}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def memory_relay(
    answer: int | None, clock: Clock, *, schedule: str = "5s,5m"
) -> tuple[Relay, WebhookService, InMemoryWebhookSubscriptions]:
    """A relay over the in-memory stores; `answer` is the subscriber's status code, or None for
    a real client whose SSRF guard refuses loopback."""
    if answer is None:
        client = make_client(
            policy=AddressPolicy(allow_loopback=False, allow_private_networks=False),
            connect_timeout=1,
            read_timeout=1,
            max_connections=1,
        )
    else:
        client = DeliveryClient(httpx.MockTransport(lambda _: httpx.Response(answer)))
    outbox = InMemoryOutboxStore()
    subs = InMemoryWebhookSubscriptions(now=clock)
    service = WebhookService(outbox=outbox, subs=subs, now=clock)
    policy = RetryPolicy(schedule=parse_schedule(schedule), jitter=0.0)
    relay = Relay(outbox, Sender(client, user_agent="test"), policy, now=clock)
    return relay, service, subs


@pytest.mark.parametrize(
    ("answer", "schedule", "expected"),
    [
        (204, "5s", "delivered"),
        (500, "5s", "failed"),
        (500, "", "dead"),  # no retry left after the first attempt
        (410, "5s", "gone"),
        (None, "5s", "refused"),
    ],
)
def test_attempts_are_counted_by_outcome(answer, schedule, expected) -> None:
    clock = Clock()
    relay, service, subs = memory_relay(answer, clock)
    if not schedule:
        relay.policy = RetryPolicy(schedule=(), jitter=0.0)
    subs.add(TOPIC, url="http://127.0.0.1:9/hook")
    service.publish(TOPIC, PAYLOAD)
    before = outcomes()
    assert relay.run_once() == 1
    after = outcomes()
    assert {o: after[o] - before[o] for o in after} == {
        o: (1.0 if o == expected else 0.0) for o in after
    }


def test_latency_runs_from_the_events_commit_to_its_delivery() -> None:
    clock = Clock()
    relay, service, subs = memory_relay(204, clock)
    subs.add(TOPIC, url="https://subscriber.test/hook")
    service.publish(TOPIC, PAYLOAD)
    latency = sample("webhooks_delivery_latency_seconds_sum")
    delivered = sample("webhooks_delivery_latency_seconds_count")
    attempts = sample("webhooks_attempt_duration_seconds_count")
    clock.now = T0 + timedelta(seconds=3)
    relay.run_once()
    assert sample("webhooks_delivery_latency_seconds_sum") - latency == pytest.approx(3.0)
    assert sample("webhooks_delivery_latency_seconds_count") == delivered + 1
    assert sample("webhooks_attempt_duration_seconds_count") == attempts + 1


def test_failed_attempts_time_the_request_but_add_no_latency() -> None:
    clock = Clock()
    relay, service, subs = memory_relay(503, clock)
    subs.add(TOPIC, url="https://subscriber.test/hook")
    service.publish(TOPIC, PAYLOAD)
    delivered = sample("webhooks_delivery_latency_seconds_count")
    attempts = sample("webhooks_attempt_duration_seconds_count")
    relay.run_once()
    assert sample("webhooks_delivery_latency_seconds_count") == delivered
    assert sample("webhooks_attempt_duration_seconds_count") == attempts + 1


def test_each_attempt_logs_one_line_with_ids_tenant_outcome_status_and_duration(caplog) -> None:
    clock = Clock()
    relay, service, subs = memory_relay(500, clock)
    sub = subs.add(TOPIC, url="https://subscriber.test/hook")
    event_id = service.publish(TOPIC, PAYLOAD)
    with caplog.at_level(logging.INFO, logger="webhooks.relay"):
        relay.run_once()
    [record] = [r for r in caplog.records if r.name == "webhooks.relay"]
    assert record.levelno == logging.INFO
    fields = record.__dict__
    assert (fields["event_id"], fields["subscription_id"], fields["tenant_id"]) == (
        event_id,
        sub.id,
        "t1",
    )
    assert (fields["outcome"], fields["status_code"], fields["attempt"]) == ("failed", 500, 1)
    assert fields["duration_ms"] >= 0
    message = record.getMessage()
    assert message.startswith("webhook failed in ")
    assert f"event_id={event_id}" in message
    assert "tenant_id=t1" in message
    assert "status_code=500" in message
    assert "error='HTTP 500'" in message


def test_a_dead_delivery_is_logged_as_a_warning(caplog) -> None:
    clock = Clock()
    relay, service, subs = memory_relay(410, clock)
    subs.add(TOPIC, url="https://subscriber.test/hook")
    service.publish(TOPIC, {"metric": "tokens"})
    with caplog.at_level(logging.INFO, logger="webhooks.relay"):
        relay.run_once()
    [record] = [r for r in caplog.records if r.name == "webhooks.relay"]
    assert (record.levelno, record.__dict__["outcome"]) == (logging.WARNING, "gone")
    assert "tenant_id=None" in record.getMessage()


# --- gauges from the database ------------------------------------------------------------------


def set_delivery(factory: sessionmaker[Session], delivery_id: str, **values) -> None:
    with factory.begin() as session:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values)
        )


def deliveries_of(factory: sessionmaker[Session], subscription_id: str) -> list[str]:
    with factory() as session:
        return list(
            session.scalars(
                WebhookDelivery.__table__.select()
                .with_only_columns(WebhookDelivery.id)
                .where(WebhookDelivery.subscription_id == subscription_id)
                .order_by(WebhookDelivery.id)
            )
        )


def gauges(factory: sessionmaker[Session], now: datetime) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(OutboxCollector(factory, now=lambda: now))
    return registry


def test_outbox_gauges_are_read_from_the_database(session_factory) -> None:
    with session_factory.begin() as session:
        subs = SqlWebhookSubscriptions(session)
        live = subs.add(TOPIC, "https://a.test/hook").id
        off = subs.add(TOPIC, "https://b.test/hook").id
        for n in range(5):
            publish(session, TOPIC, PAYLOAD, event_id=f"e{n}")
    with session_factory.begin() as session:
        SqlWebhookSubscriptions(session).disable(off, "test")
    d = deliveries_of(session_factory, live)
    set_delivery(session_factory, d[0], status="delivered", next_attempt_at=None)
    set_delivery(session_factory, d[1], status="dead", next_attempt_at=None)
    set_delivery(session_factory, d[2], status="failed", next_attempt_at=T0 + timedelta(hours=1))
    set_delivery(session_factory, d[3], next_attempt_at=T0 - timedelta(seconds=90))
    set_delivery(session_factory, d[4], next_attempt_at=T0 - timedelta(seconds=30))

    registry = gauges(session_factory, T0)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    # The disabled subscription's five pending deliveries wait for an operator, not a relay.
    assert value("webhooks_outbox_backlog", status="pending") == 2
    assert value("webhooks_outbox_backlog", status="failed") == 1
    assert value("webhooks_outbox_due") == 2
    assert value("webhooks_outbox_oldest_pending_age_seconds") == 90
    assert value("webhooks_deliveries_dead") == 1
    assert value("webhooks_subscriptions_disabled") == 1
    # Before anything falls due, nothing is late.
    later = gauges(session_factory, T0 - timedelta(minutes=5))
    assert later.get_sample_value("webhooks_outbox_oldest_pending_age_seconds") == 0
    assert later.get_sample_value("webhooks_outbox_due") == 0


def test_an_empty_outbox_reports_zeros(session_factory) -> None:
    registry = gauges(session_factory, T0)
    for name in (
        "webhooks_outbox_due",
        "webhooks_outbox_oldest_pending_age_seconds",
        "webhooks_deliveries_dead",
        "webhooks_subscriptions_disabled",
    ):
        assert registry.get_sample_value(name) == 0, name
    assert registry.get_sample_value("webhooks_outbox_backlog", {"status": "pending"}) == 0


def test_without_a_database_the_gauges_are_left_out_and_the_rest_still_renders(
    tmp_path, caplog
) -> None:
    from webhooks.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'no.sqlite3'}")
    collector = OutboxCollector(sessionmaker(engine))
    with caplog.at_level(logging.WARNING, logger="webhooks.metrics"):
        body, content_type = render(collector)
    engine.dispose()
    assert b"webhooks_deliveries_total" in body
    assert b"webhooks_outbox_backlog{" not in body
    assert "outbox metrics unavailable" in caplog.text
    assert content_type.startswith("text/plain")


# --- exposition ------------------------------------------------------------------------------

_COUNT_IN_A_PROCESS = """
from webhooks.metrics import DELIVERIES
DELIVERIES.labels(outcome="delivered").inc(2)
"""

_RENDER = """
import sys
from webhooks.metrics import render
sys.stdout.write(render()[0].decode())
"""


def test_with_a_multiprocess_dir_every_process_counts_into_one_exposition(tmp_path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _COUNT_IN_A_PROCESS], env=env, check=True, timeout=60)
    shown = subprocess.run(
        [sys.executable, "-c", _RENDER], env=env, check=True, timeout=60, capture_output=True
    ).stdout.decode()
    assert 'webhooks_deliveries_total{outcome="delivered"} 4.0' in shown


def test_a_background_relay_delivers_serves_its_metrics_and_stops(sqlite_engine) -> None:
    factory = sessionmaker(sqlite_engine)
    port = free_port()
    settings = WebhookSettings(
        allow_loopback=True, poll_interval=0.05, metrics_port=port, shutdown_timeout=5
    )
    delivered = sample("webhooks_deliveries_total", outcome="delivered")
    with accepting_receiver() as url:
        with factory.begin() as session:
            SqlWebhookSubscriptions(session).add(TOPIC, url)
            publish(session, TOPIC, PAYLOAD, event_id="bg-1")
        relay = start_relay(settings, engine=sqlite_engine)
        try:
            wait_until(
                lambda: sample("webhooks_deliveries_total", outcome="delivered") != delivered,
                what="the delivery",
            )
            metrics = f"http://127.0.0.1:{port}/metrics"
            pending = 'webhooks_outbox_backlog{status="pending"} 0.0'
            # the outcome is recorded a moment after it is counted
            wait_until(lambda: pending in httpx.get(metrics, timeout=5).text, what=pending)
            shown = httpx.get(metrics, timeout=5).text
            assert "webhooks_deliveries_dead 0.0" in shown
            assert "webhooks_deliveries_total" in shown
        finally:
            relay.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_the_relay_process_logs_each_delivery_as_a_json_line_when_asked(sqlite_engine) -> None:
    factory = sessionmaker(sqlite_engine)
    env = {
        **os.environ,
        "DATABASE_URL": sqlite_engine.url.render_as_string(hide_password=False),
        "WEBHOOKS_ALLOW_LOOPBACK": "true",
        "WEBHOOKS_POLL_INTERVAL": "0.05",
        "LOG_FORMAT": "json",
    }
    with accepting_receiver() as url:
        with factory.begin() as session:
            sub_id = SqlWebhookSubscriptions(session).add(TOPIC, url).id
            event_id = publish(session, TOPIC, PAYLOAD)
        relay = subprocess.Popen(
            [sys.executable, "-m", "webhooks.relay"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            assert relay.stderr is not None
            deadline = time.monotonic() + 30
            entry: dict = {}
            while entry.get("message", "").startswith("webhook ") is False:
                assert time.monotonic() < deadline, "no delivery line"
                entry = json.loads(relay.stderr.readline())
        finally:
            relay.terminate()
            rest = relay.communicate(timeout=30)[1]
    assert relay.returncode == 0, rest
    assert {k: entry[k] for k in ("event_id", "subscription_id", "tenant_id", "outcome")} == {
        "event_id": event_id,
        "subscription_id": sub_id,
        "tenant_id": "t1",
        "outcome": "delivered",
    }
    assert (entry["status_code"], entry["logger"], entry["level"]) == (
        204,
        "webhooks.relay",
        "INFO",
    )
    assert entry["duration_ms"] >= 0
    assert [json.loads(line)["level"] for line in rest.splitlines()]  # JSON to the end
