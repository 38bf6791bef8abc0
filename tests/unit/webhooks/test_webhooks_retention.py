"""Retention: delivered deliveries and old events are pruned in batches; the rest is kept."""

from __future__ import annotations

import argparse
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from webhooks import publish
from webhooks.cli import add_commands
from webhooks.models import WebhookDelivery, WebhookEvent
from webhooks.retention import Pruned, Pruner, prune
from webhooks.settings import WebhookSettings
from webhooks.subscriptions import SqlWebhookSubscriptions

TOPIC = "billing.invoice.created"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD = NOW - timedelta(days=31)
RECENT = NOW - timedelta(days=29)
RETENTION = timedelta(days=30)


def event(session: Session, created_at: datetime, status: str | None, **delivery) -> str:
    """An event created at `created_at`, delivered to the one subscription with `status`."""
    event_id = publish(session, TOPIC, {"tenant_id": "t1", "invoice_id": "i"})
    session.execute(
        update(WebhookEvent).where(WebhookEvent.id == event_id).values(created_at=created_at)
    )
    if status is None:
        session.execute(
            WebhookDelivery.__table__.delete().where(WebhookDelivery.event_id == event_id)
        )
    else:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.event_id == event_id)
            .values(status=status, **delivery)
        )
    return event_id


def remaining(sessions: sessionmaker[Session]) -> tuple[set[str], set[str]]:
    with sessions() as session:
        events = set(session.scalars(select(WebhookEvent.id)))
        deliveries = set(session.scalars(select(WebhookDelivery.event_id)))
    return events, deliveries


@pytest.fixture
def sessions(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with session_factory.begin() as session:
        SqlWebhookSubscriptions(session).add(TOPIC, "https://example.test/hook")
    return session_factory


def test_old_delivered_rows_go_and_everything_else_stays(sessions) -> None:
    with sessions.begin() as session:
        old_delivered = event(session, OLD, "delivered", delivered_at=OLD)
        recent_delivered = event(session, OLD, "delivered", delivered_at=RECENT)
        old_dead = event(session, OLD, "dead")
        old_failed = event(session, OLD, "failed", next_attempt_at=NOW)
        old_unsubscribed = event(session, OLD, None)
        recent_unsubscribed = event(session, RECENT, None)

    pruned = prune(sessions, NOW, RETENTION)

    assert (pruned.deliveries, pruned.events) == (1, 2)
    events, deliveries = remaining(sessions)
    assert events == {recent_delivered, old_dead, old_failed, recent_unsubscribed}
    assert deliveries == {recent_delivered, old_dead, old_failed}
    assert old_delivered not in events
    assert old_unsubscribed not in events
    assert prune(sessions, NOW, RETENTION) == Pruned(0, 0)  # a second run changes nothing


def test_pruning_goes_batch_by_batch_to_the_end(sessions) -> None:
    with sessions.begin() as session:
        for _ in range(7):
            event(session, OLD, "delivered", delivered_at=OLD)
    pruned = prune(sessions, NOW, RETENTION, batch_size=2)
    assert (pruned.deliveries, pruned.events) == (7, 7)
    assert remaining(sessions) == (set(), set())


def test_a_set_stop_ends_pruning_between_batches(sessions) -> None:
    with sessions.begin() as session:
        for _ in range(3):
            event(session, OLD, "delivered", delivered_at=OLD)
    stop = threading.Event()
    stop.set()
    assert prune(sessions, NOW, RETENTION, batch_size=1, stop=stop) == Pruned(0, 0)
    assert len(remaining(sessions)[0]) == 3


def test_the_pruner_prunes_when_it_starts_and_stops(sessions) -> None:
    with sessions.begin() as session:
        event(session, OLD, "delivered", delivered_at=OLD)
    pruner = Pruner(sessions, RETENTION, timedelta(hours=1), now=lambda: NOW).start()
    try:
        for _ in range(200):
            if remaining(sessions) == (set(), set()):
                break
            threading.Event().wait(0.02)
    finally:
        pruner.stop()
    assert remaining(sessions) == (set(), set())


@pytest.mark.postgres
def test_concurrent_prunes_delete_each_row_once(pg_engine: Engine, race) -> None:
    sessions = sessionmaker(pg_engine, expire_on_commit=False)
    with sessions.begin() as session:
        SqlWebhookSubscriptions(session).add(TOPIC, "https://example.test/hook")
        for _ in range(60):
            event(session, OLD, "delivered", delivered_at=OLD)
    results = race(4, lambda _: prune(sessions, NOW, RETENTION, batch_size=5))
    assert sum(r.deliveries for r in results) == 60
    assert sum(r.events for r in results) == 60
    assert remaining(sessions) == (set(), set())


def test_retention_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (WebhookSettings().retention, WebhookSettings().prune_interval) == (
        timedelta(days=30),
        timedelta(hours=1),
    )
    monkeypatch.setenv("WEBHOOKS_RETENTION", "7d")
    monkeypatch.setenv("WEBHOOKS_PRUNE_INTERVAL", "15m")
    settings = WebhookSettings()
    assert (settings.retention, settings.prune_interval) == (
        timedelta(days=7),
        timedelta(minutes=15),
    )


def test_billing_webhooks_prune(sessions, engine: Engine, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DATABASE_URL", engine.url.render_as_string(hide_password=False))
    with sessions.begin() as session:
        event(
            session,
            datetime.now(UTC) - timedelta(days=10),
            "delivered",
            delivered_at=datetime.now(UTC) - timedelta(days=10),
        )
    parser = argparse.ArgumentParser(prog="billing")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["webhooks", "prune"])
    assert args.handler(args) == 0
    assert "0 delivered deliveries and 0 events deleted" in capsys.readouterr().out
    args = parser.parse_args(["webhooks", "prune", "--older-than", "7d"])
    assert args.handler(args) == 0
    assert "1 delivered deliveries and 1 events deleted" in capsys.readouterr().out
