"""The Dramatiq actors on a StubBroker with a real Worker: payloads, retries, dead letters."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from billing.models import Invoice, Tenant, UsageAggregate
from workers import actors
from workers.broker import QUEUE_NAME
from workers.errors import InvalidPayloadError
from workers.jobs import INVOICE_CREATED, USAGE_AGGREGATED

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
JOIN_MS = 10_000


def test_enqueue_helpers_send_the_contract_payloads(stub_broker) -> None:
    day = actors.enqueue_aggregate_daily(
        tenant_id="t1", metric="tokens", day_start=datetime(2025, 1, 1, 15, 30, tzinfo=UTC)
    )
    inv = actors.enqueue_generate_monthly_invoice(
        tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
    )
    assert (day.actor_name, day.queue_name, day.args) == (
        "billing.aggregate_daily",
        QUEUE_NAME,
        ({"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01T00:00:00+00:00"},),
    )
    assert (inv.actor_name, inv.args) == (
        "billing.generate_monthly_invoice",
        (
            {
                "tenant_id": "t1",
                "period_start": "2025-01-01T00:00:00+00:00",
                "period_end": "2025-02-01T00:00:00+00:00",
                "currency": "usd",
            },
        ),
    )
    assert stub_broker.queues[QUEUE_NAME].qsize() == 2


def test_enqueue_helpers_refuse_naive_datetimes_and_send_nothing(stub_broker) -> None:
    with pytest.raises(InvalidPayloadError, match="day_start"):
        actors.enqueue_aggregate_daily(
            tenant_id="t1", metric="tokens", day_start=datetime(2025, 1, 1)
        )
    with pytest.raises(InvalidPayloadError, match="tenant_id"):
        actors.enqueue_generate_monthly_invoice(
            tenant_id="", period_start=JAN, period_end=FEB, currency="usd"
        )
    assert stub_broker.queues[QUEUE_NAME].qsize() == 0


def test_the_actors_write_rows_and_events(stub_broker, stub_worker, bound, seeded, outbox) -> None:
    seeded([("t1", 5, JAN), ("t1", 6, JAN + timedelta(hours=2))], plan_for=("t1",))
    actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=JAN)
    stub_broker.join(QUEUE_NAME, timeout=JOIN_MS)
    stub_worker.join()
    actors.enqueue_generate_monthly_invoice(
        tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
    )
    stub_broker.join(QUEUE_NAME, timeout=JOIN_MS)
    stub_worker.join()
    assert [e["total"] for e in outbox(USAGE_AGGREGATED)] == [11]
    [invoice_event] = outbox(INVOICE_CREATED)
    with bound() as session:
        invoice = session.get(Invoice, invoice_event["invoice_id"])
        assert invoice is not None
        assert invoice.total_amount == 1000 + 11


def test_the_same_message_delivered_three_times_leaves_one_row_and_one_event(
    stub_broker, stub_worker, bound, seeded, outbox
) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    for _ in range(3):
        actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=JAN)
        actors.enqueue_generate_monthly_invoice(
            tenant_id="t1", period_start=JAN, period_end=FEB, currency="usd"
        )
    stub_broker.join(QUEUE_NAME, timeout=JOIN_MS)
    stub_worker.join()
    assert len(outbox(USAGE_AGGREGATED)) == 1
    assert len(outbox(INVOICE_CREATED)) == 1
    with bound() as session:
        assert session.execute(select(func.count()).select_from(Invoice)).scalar_one() == 1
        assert session.execute(select(func.count()).select_from(UsageAggregate)).scalar_one() == 1


def assert_dead_lettered_at_once(stub_broker, stub_worker) -> None:
    """The one message sent failed without a retry and is the one dead letter."""
    stub_broker.join(QUEUE_NAME, timeout=JOIN_MS, fail_fast=False)
    stub_worker.join()
    [dead] = stub_broker.dead_letters
    assert dead.options.get("retries", 0) == 0


def test_a_bad_payload_is_dead_lettered_at_once_and_logged(
    stub_broker, stub_worker, bound, caplog
) -> None:
    caplog.set_level(logging.INFO)
    actors.aggregate_daily.send({"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01"})
    assert_dead_lettered_at_once(stub_broker, stub_worker)
    assert "billing.aggregate_daily not run" in caplog.text
    assert "dead-lettering message" in caplog.text
    assert "day_start" in caplog.text
    with bound() as session:
        assert session.execute(select(func.count()).select_from(UsageAggregate)).scalar_one() == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"tenant_id": "t1", "metric": "tokens", "day_start": "9999-12-31T23:00:00-05:00"},
        {"tenant_id": "t1", "metric": "tokens", "day_start": "9998-12-31T00:00:01+00:00"},
        {
            "tenant_id": "t1",
            "period_start": "0001-01-01T00:00:00+01:00",
            "period_end": "2025-01-01T00:00:00+00:00",
            "currency": "usd",
        },
    ],
)
def test_a_time_at_the_end_of_the_calendar_is_refused_at_once_not_retried(
    stub_broker, stub_worker, bound, caplog, payload
) -> None:
    """Past year 1 or 9999 in UTC (or within a day or a month of it) a time cannot be a day or
    a month: refused as a bad payload, where it used to overflow and be retried."""
    caplog.set_level(logging.INFO)
    actor = actors.aggregate_daily if "day_start" in payload else actors.generate_monthly_invoice
    actor.send(payload)
    assert_dead_lettered_at_once(stub_broker, stub_worker)
    assert "must be from 0002-01-01 to 9998-12-31 (UTC)" in caplog.text


def test_the_enqueue_helpers_take_the_first_and_last_days_and_refuse_past_them(stub_broker) -> None:
    first, last = datetime(2, 1, 1, tzinfo=UTC), datetime(9998, 12, 31, tzinfo=UTC)
    for day in (first, last):
        actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=day)
    past_the_end = datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))
    for day in (first - timedelta(microseconds=1), last + timedelta(microseconds=1), past_the_end):
        with pytest.raises(InvalidPayloadError, match=r"day_start: .*must be from 0002-01-01"):
            actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=day)
    assert stub_broker.queues[QUEUE_NAME].qsize() == 2


def test_a_transient_failure_is_retried_within_bounds_then_dead_lettered(
    stub_broker, stub_worker, worker_settings, session_factory
) -> None:
    calls = []

    def failing_factory():
        calls.append(1)
        raise OperationalError("SELECT 1", {}, Exception("database is restarting"))

    class Factory:
        begin = staticmethod(failing_factory)

    actors.bind(Factory())  # type: ignore[arg-type]
    try:
        actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=JAN)
        stub_broker.join(QUEUE_NAME, timeout=JOIN_MS, fail_fast=False)
        stub_worker.join()
    finally:
        actors.unbind()
    assert len(calls) == 1 + worker_settings.job_max_retries
    [dead] = stub_broker.dead_letters
    assert dead.options["retries"] == 1 + worker_settings.job_max_retries


def test_a_transient_failure_that_clears_succeeds_on_retry(
    stub_broker, stub_worker, bound, seeded, outbox
) -> None:
    seeded([("t1", 5, JAN)])
    attempts = []

    class FlakyOutbox:
        def publish(self, session, topic, payload, *, event_id=None):
            attempts.append(1)
            if len(attempts) == 1:
                raise OperationalError("INSERT", {}, Exception("connection reset"))
            import webhooks

            return webhooks.publish(session, topic, payload, event_id=event_id)

    actors.bind(bound, webhooks=FlakyOutbox())
    actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=JAN)
    stub_broker.join(QUEUE_NAME, timeout=JOIN_MS)
    stub_worker.join()
    assert len(attempts) == 2
    assert [e["total"] for e in outbox(USAGE_AGGREGATED)] == [5]
    assert stub_broker.dead_letters == []


def test_an_unbound_worker_says_what_is_missing(stub_broker, stub_worker, caplog) -> None:
    actors.unbind()
    actors.aggregate_daily.send_with_options(
        args=({"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01T00:00:00Z"},),
        max_retries=0,
    )
    stub_broker.join(QUEUE_NAME, timeout=JOIN_MS, fail_fast=False)
    stub_worker.join()
    assert "workers.actors.bind(session_factory)" in caplog.text


def test_a_tenant_zone_missing_from_this_machines_database_is_dead_lettered_at_once(
    stub_broker, stub_worker, bound, seeded, caplog
) -> None:
    # Stored by a machine whose zone database has it; this worker's has not.
    seeded([("t1", 5, JAN)])
    with bound.begin() as session:
        session.add(Tenant(id="t1", name="t1", timezone="Mars/Olympus", created_at=JAN))
    actors.enqueue_aggregate_daily(tenant_id="t1", metric="tokens", day_start=JAN)
    assert_dead_lettered_at_once(stub_broker, stub_worker)
    assert "InvalidTimezoneError" in caplog.text
    assert "'Mars/Olympus' is not in this machine's zone database" in caplog.text
    with bound() as session:
        assert session.execute(select(func.count()).select_from(UsageAggregate)).scalar_one() == 0
