"""`billing status`: the report's figures, what fails it, and the command (SQLite, fakeredis)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
from dramatiq import Worker
from sqlalchemy import func, select

from billing.models import Invoice, Price, UsageAggregate
from webhooks.models import DEAD, FAILED, PENDING, WebhookDelivery, WebhookEvent
from webhooks.models import WebhookSubscription as Subscription
from workers import actors
from workers.broker import QUEUE_NAME, build_broker
from workers.cli import main
from workers.queues import DeadLetter
from workers.settings import WorkerSettings
from workers.status import collect_status, dead_letter_line
from workers.status_view import format_status, status_json

from .conftest import add_plan, subscribe, use

# 2025-02-10 12:00 UTC: January's invoices were due on the 1st at 00:30 (+6 h of grace).
NOW = datetime(2025, 2, 10, 12, 0, tzinfo=UTC)
JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
SETTINGS = WorkerSettings()


def status(session_factory, broker, settings=SETTINGS, now=NOW):
    return collect_status(session_factory, settings, broker, now=lambda: now)


@pytest.fixture
def fake_redis_broker():
    """The actors on a RedisBroker over fakeredis, as if REDIS_URL were set."""
    settings = WorkerSettings(namespace="status")
    broker = build_broker(settings, redis_client=fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    previous = actors.attach(broker, settings=settings)
    yield broker
    actors.attach(previous, settings=actors.settings)


def dead_letter_one(broker, session_factory, send=None) -> None:
    """Run one message (by default one with a bad payload): it is dead-lettered at once."""
    actors.bind(session_factory)
    worker = Worker(broker, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        if send is None:
            actors.aggregate_daily.send({"tenant_id": "t1", "metric": "tokens"})  # no day_start
        else:
            send()
        broker.join(QUEUE_NAME, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        actors.unbind()


def test_an_empty_system_is_healthy(session_factory, fake_redis_broker) -> None:
    report = status(session_factory, fake_redis_broker)
    assert report.healthy
    assert report.broker == "redis"
    [queue] = report.queues
    assert (queue.name, queue.ready, queue.dead, queue.dead_recent) == (QUEUE_NAME, 0, 0, 0)
    assert (report.outbox.backlog, report.outbox.oldest_pending_age) == (0, None)
    assert (report.last_aggregate_at, report.last_invoice_at, report.sync) == (None, None, None)
    assert report.invoice_run is not None
    assert (report.invoice_run.period_start, report.invoice_run.expected) == (
        datetime(2025, 1, 1, tzinfo=UTC),
        0,
    )


def test_a_recent_dead_letter_needs_a_human_and_an_old_one_no_longer(
    session_factory, fake_redis_broker
) -> None:
    dead_letter_one(fake_redis_broker, session_factory)
    actors.enqueue_aggregate_daily(tenant_id="t9", metric="tokens", day_start=NOW)
    now = datetime.now(UTC)
    report = status(session_factory, fake_redis_broker, now=now)
    [queue] = report.queues
    assert (queue.ready, queue.dead, queue.dead_recent) == (1, 1, 1)
    [letter] = queue.recent_dead_letters
    assert report.problems == [
        "queue billing: 1 message(s) dead-lettered in the last 24 h (see `billing jobs`)",
        f"billing.aggregate_daily for tenant t1 is dead (message {letter.message_id}): "
        "InvalidPayloadError: billing.aggregate_daily payload rejected: day_start: Field required",
    ]
    later = status(session_factory, fake_redis_broker, now=now + timedelta(days=2))
    assert later.queues[0].dead == 1
    assert later.healthy


def test_an_invoice_over_2_63_minus_1_is_dead_at_once_and_status_names_tenant_and_line(
    session_factory, fake_redis_broker
) -> None:
    with session_factory.begin() as session:
        plan = add_plan(session)  # 10.00 a month and 1 cent a token
        session.add(
            Price(plan_id=plan.id, key="big", currency="usd", metric="tokens", unit_amount=2)
        )
        subscribe(session, "t1", plan)
        use(session, "t1", 2**62, JAN + timedelta(days=3))
    dead_letter_one(
        fake_redis_broker,
        session_factory,
        lambda: actors.enqueue_generate_monthly_invoice(
            tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
        ),
    )
    report = status(session_factory, fake_redis_broker, now=datetime.now(UTC))
    [letter] = report.queues[0].recent_dead_letters
    assert letter.retries == 0  # a permanent error: not retried
    assert report.problems[1].startswith(
        f"billing.generate_monthly_invoice for tenant t1 is dead (message {letter.message_id}): "
        "AmountOverflowError: the line of metric 'tokens' at price 'big' (2 per unit)"
    )
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Invoice)) == 0


def add_delivery(session_factory, status_: str, *, due: datetime, updated: datetime, sub=None):
    with session_factory.begin() as session:
        if sub is None:
            sub = Subscription(topic="billing.invoice.created", url="https://x.test/h", secret="s")
            session.add(sub)
            session.flush()
        event = WebhookEvent(topic="billing.invoice.created", payload={}, created_at=due)
        session.add(event)
        session.flush()
        session.add(
            WebhookDelivery(
                event_id=event.id,
                subscription_id=sub.id,
                status=status_,
                next_attempt_at=due,
                created_at=due,
                updated_at=updated,
            )
        )
        return sub.id


def test_dead_deliveries_fail_the_status_while_recent(session_factory, stub_broker) -> None:
    add_delivery(
        session_factory, DEAD, due=NOW - timedelta(days=5), updated=NOW - timedelta(days=3)
    )
    report = status(session_factory, stub_broker)
    assert (report.outbox.dead, report.outbox.dead_recent, report.healthy) == (1, 0, True)
    add_delivery(
        session_factory, DEAD, due=NOW - timedelta(days=2), updated=NOW - timedelta(hours=1)
    )
    report = status(session_factory, stub_broker)
    assert (report.outbox.dead, report.outbox.dead_recent) == (2, 1)
    assert report.problems == [
        "1 webhook delivery(ies) died in the last 24 h "
        "(see `billing webhooks deliveries`, then replay)"
    ]


def test_a_delivery_waiting_too_long_for_the_relay_fails_the_status(
    session_factory, stub_broker
) -> None:
    add_delivery(session_factory, PENDING, due=NOW - timedelta(minutes=1), updated=NOW)
    add_delivery(session_factory, FAILED, due=NOW + timedelta(hours=2), updated=NOW)  # later
    report = status(session_factory, stub_broker)
    assert (report.outbox.backlog, report.outbox.oldest_pending_age) == (2, timedelta(minutes=1))
    assert report.healthy
    add_delivery(session_factory, FAILED, due=NOW - timedelta(minutes=20), updated=NOW)
    report = status(session_factory, stub_broker)
    assert report.outbox.oldest_pending_age == timedelta(minutes=20)
    assert report.problems == [
        "a webhook delivery has waited 20 min for the relay (over 15 min): is the relay running?"
    ]


def test_a_disabled_subscription_fails_the_status_and_is_named(
    session_factory, stub_broker
) -> None:
    with session_factory.begin() as session:
        sub = Subscription(
            topic="billing.usage_aggregated",
            url="https://gone.test/h",
            secret="s",
            enabled=False,
            disabled_reason="410 Gone",
        )
        session.add(sub)
        session.flush()
        sub_id = sub.id
    report = status(session_factory, stub_broker)
    [disabled] = report.outbox.disabled
    assert (disabled.id, disabled.url, disabled.reason) == (
        sub_id,
        "https://gone.test/h",
        "410 Gone",
    )
    assert report.problems == [
        f"webhook subscription {sub_id} (billing.usage_aggregated) is disabled: 410 Gone"
    ]


def test_a_subscribers_text_is_shown_escaped_in_text_and_json(session_factory, stub_broker) -> None:
    reason = "410 Gone\nneeds a human:\x1b]0;owned\x07"
    url = "https://gone.test/\u202eh"
    with session_factory.begin() as session:
        session.add(
            Subscription(
                topic="billing.usage_aggregated",
                url=url,
                secret="s",
                enabled=False,
                disabled_reason=reason,
            )
        )
    report = status(session_factory, stub_broker)
    text = format_status(report)
    assert not {"\x1b", "\x07", "\u202e"} & set(text)
    assert "https://gone.test/\\u202eh: 410 Gone\\nneeds a human:\\x1b]0;owned\\x07" in text
    assert [line for line in text.splitlines() if line.startswith("needs")] == ["needs a human:"]
    encoded = status_json(report)
    assert not {"\x1b", "\x07", "\u202e"} & set(encoded)
    [disabled] = json.loads(encoded)["outbox"]["disabled"]
    assert (disabled["url"], disabled["reason"]) == (url, reason)


def seed(session_factory, *, usage=(), aggregates=()) -> None:
    with session_factory.begin() as session:
        for at in usage:
            use(session, "t1", 3, at)
        for day, updated in aggregates:
            session.add(
                UsageAggregate(
                    tenant_id="t1",
                    metric="tokens",
                    period_start=day,
                    granularity="day",
                    total=3,
                    updated_at=updated,
                )
            )


STALE = "no usage aggregated for over 36 h while finished days have usage"


def test_usage_of_a_finished_day_never_aggregated_fails_the_status(
    session_factory, stub_broker
) -> None:
    seed(session_factory, usage=[NOW - timedelta(days=3)])
    report = status(session_factory, stub_broker)
    assert report.last_aggregate_at is None
    assert any(p.startswith(STALE) for p in report.problems)


def test_usage_of_today_or_of_a_day_just_ended_waits_for_its_daily_run(
    session_factory, stub_broker
) -> None:
    ninth, tenth = datetime(2025, 2, 9, tzinfo=UTC), datetime(2025, 2, 10, tzinfo=UTC)
    seed(session_factory, usage=[ninth + timedelta(hours=21), tenth + timedelta(hours=1)])
    for now in (tenth + timedelta(minutes=5), tenth + timedelta(hours=11, minutes=55)):
        assert status(session_factory, stub_broker, now=now).healthy
    # 36 h after the 9th began (12 h after its daily run was due), its usage needs a human.
    late = status(session_factory, stub_broker, now=tenth + timedelta(hours=12, minutes=5))
    assert any(p.startswith(STALE) for p in late.problems)


def test_stale_aggregates_fail_the_status_only_if_usage_waits(session_factory, stub_broker) -> None:
    day = datetime(2025, 2, 7, tzinfo=UTC)
    seed(
        session_factory,
        usage=[day + timedelta(hours=5)],
        aggregates=[(day, day + timedelta(days=1, minutes=10))],  # aggregated on the 8th
    )
    report = status(session_factory, stub_broker)  # the 10th: the last aggregate is 60 h old
    assert report.last_aggregate_at == day + timedelta(days=1, minutes=10)
    assert report.healthy  # a quiet system: nothing new to aggregate
    seed(session_factory, usage=[day + timedelta(days=1, hours=9)])  # the 8th, never aggregated
    assert any(p.startswith(STALE) for p in status(session_factory, stub_broker).problems)


def test_missing_invoices_fail_the_status_after_the_grace(session_factory, stub_broker) -> None:
    with session_factory.begin() as session:
        plan = add_plan(session)
        subscribe(session, "t1", plan)
    during_grace = datetime(2025, 2, 1, 3, 0, tzinfo=UTC)
    report = status(session_factory, stub_broker, now=during_grace)
    assert (report.invoice_run.expected, report.invoice_run.missing) == (1, 1)
    assert report.healthy
    report = status(session_factory, stub_broker)
    assert report.problems == [
        "1 of 1 invoice(s) for 2025-01 missing since 2025-02-01 06:30 UTC "
        "(see `billing invoice --period`)"
    ]
    add_invoice(session_factory, created=datetime(2025, 2, 1, 0, 31, tzinfo=UTC))
    report = status(session_factory, stub_broker)
    assert (report.invoice_run.missing, report.healthy) == (0, True)
    assert report.last_invoice_at == datetime(2025, 2, 1, 0, 31, tzinfo=UTC)


def add_invoice(session_factory, *, created: datetime, provider_id: str | None = None) -> None:
    with session_factory.begin() as session:
        session.add(
            Invoice(
                tenant_id="t1",
                period_start=datetime(2025, 1, 1, tzinfo=UTC),
                period_end=datetime(2025, 2, 1, tzinfo=UTC),
                total_amount=1000,
                currency="usd",
                provider_invoice_id=provider_id,
                created_at=created,
            )
        )


def test_unsynced_invoices_fail_the_status_only_with_a_provider_sync(
    session_factory, stub_broker
) -> None:
    syncing = WorkerSettings(provider_sync="billing_hooks:stripe_sync")
    add_invoice(session_factory, created=NOW - timedelta(hours=1))
    report = status(session_factory, stub_broker, settings=syncing)
    assert (report.sync.unsynced, report.sync.overdue, report.healthy) == (1, 0, True)
    later = NOW + timedelta(hours=6)
    report = status(session_factory, stub_broker, settings=syncing, now=later)
    assert report.problems == ["1 invoice(s) not synced to the payment provider 6 h after creation"]
    assert status(session_factory, stub_broker, now=later).healthy  # sync off: not a problem


def test_the_report_renders_on_one_screen_and_as_json(session_factory, fake_redis_broker) -> None:
    add_delivery(session_factory, DEAD, due=NOW, updated=NOW)
    report = status(session_factory, fake_redis_broker)
    text = format_status(report)
    assert (
        text.splitlines()[0] == "billing status at 2025-02-10T12:00:00+00:00: NEEDS ATTENTION (1)"
    )
    assert "  billing                 0        0         0     0              0" in text
    assert "  dead deliveries         1 (1 recently)" in text
    assert "  last aggregate          never" in text
    assert "  invoices 2025-01        0 of 0 generated" in text
    assert "  provider sync           off (no PROVIDER_SYNC)" in text
    assert text.endswith("then replay)")
    assert len(text.splitlines()) < 25
    body = json.loads(status_json(report))
    assert body["healthy"] is False
    assert body["outbox"]["dead"] == 1
    assert body["queues"][0]["name"] == QUEUE_NAME
    assert body["checked_at"] == "2025-02-10T12:00:00+00:00"


# --- the command ------------------------------------------------------------------------------


@pytest.fixture
def cli_database(sqlite_engine, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    from billing.db import make_session_factory

    return make_session_factory(sqlite_engine)


def test_the_command_exits_0_when_healthy_and_1_when_a_human_is_needed(
    cli_database, fake_redis_broker, capsys
) -> None:
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert ": OK" in out.splitlines()[0]
    assert "queues (redis)" in out
    dead_letter_one(fake_redis_broker, cli_database)
    assert main(["status", "--json"]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["queues"][0]["dead_recent"] == 1
    assert body["problems"][0] == (
        "queue billing: 1 message(s) dead-lettered in the last 24 h (see `billing jobs`)"
    )
    assert body["problems"][1].startswith("billing.aggregate_daily for tenant t1 is dead")
    assert body["queues"][0]["recent_dead_letters"][0]["actor_name"] == "billing.aggregate_daily"


def test_the_command_says_so_when_the_queue_is_in_process(
    cli_database, stub_broker, capsys
) -> None:
    assert main(["status"]) == 0
    assert "queues: in-process" in capsys.readouterr().out


def test_the_command_exits_2_when_the_database_cannot_be_read(monkeypatch, capsys) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://billing@127.0.0.1:1/billing")
    assert main(["status"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("billing status: cannot use the database at postgresql://billing@")


def letter(args) -> DeadLetter:
    return DeadLetter("m1", "billing.sync_invoice", args, 0, None, "InvalidPayloadError: why")


@pytest.mark.parametrize(
    ("args", "about"),
    [
        ([{"invoice_id": "inv_1"}], " for invoice inv_1"),
        ([{"tenant_id": "t1", "invoice_id": "inv_1"}], " for tenant t1"),
        ([{"tenant_id": "", "invoice_id": "inv_1"}], " for invoice inv_1"),
        ([{"invoice_id": ""}], ""),
        ([{"invoice_id": "  "}], ""),
        ([{"invoice_id": None}], ""),
        ([{}], ""),
        ([], ""),
        (["not a payload"], ""),
    ],
)
def test_a_dead_letter_line_names_a_tenant_or_invoice_only_when_the_payload_has_one(
    args, about
) -> None:
    assert dead_letter_line(letter(args)) == (
        f"billing.sync_invoice{about} is dead (message m1): InvalidPayloadError: why"
    )


def test_a_dead_job_with_an_empty_invoice_id_is_named_without_one(
    session_factory, fake_redis_broker
) -> None:
    dead_letter_one(
        fake_redis_broker, session_factory, lambda: actors.sync_invoice.send({"invoice_id": ""})
    )
    report = status(session_factory, fake_redis_broker, now=datetime.now(UTC))
    [letter_] = report.queues[0].recent_dead_letters
    assert report.problems[1].startswith(
        f"billing.sync_invoice is dead (message {letter_.message_id}): InvalidPayloadError"
    )
