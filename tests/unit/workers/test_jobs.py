"""The plain job functions: one transaction, the change and its event, safe to run again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

import webhooks
from billing.errors import CurrencyMismatchError
from billing.models import Invoice, UsageAggregate
from webhooks.models import WebhookEvent
from workers.errors import InvalidPayloadError, UnknownJobError
from workers.jobs import (
    INVOICE_CREATED,
    USAGE_AGGREGATED,
    aggregate_daily_job,
    generate_monthly_invoice_job,
    make_billing_job_handler,
)

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
DAY_PAYLOAD = {"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01T00:00:00+00:00"}
INVOICE_PAYLOAD = {
    "tenant_id": "t1",
    "period_start": "2025-01-01T00:00:00+00:00",
    "period_end": "2025-02-01T00:00:00+00:00",
    "currency": "usd",
}


def count(session_factory, model) -> int:
    with session_factory() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def test_aggregate_daily_job_stores_the_total_and_announces_it(
    session_factory, seeded, outbox
) -> None:
    seeded([("t1", 5, JAN + timedelta(hours=1)), ("t1", 7, JAN + timedelta(hours=23))])
    assert aggregate_daily_job(session_factory, DAY_PAYLOAD) == 12
    [event] = outbox(USAGE_AGGREGATED)
    assert {k: v for k, v in event.items() if k != "id"} == {
        "tenant_id": "t1",
        "metric": "tokens",
        "day_start": "2025-01-01T00:00:00+00:00",
        "total": 12,
    }
    with session_factory() as session:
        [row] = session.execute(select(UsageAggregate)).scalars()
        assert (row.tenant_id, row.period_start, row.total) == ("t1", JAN, 12)


def test_a_rerun_with_the_same_total_emits_nothing_new(session_factory, seeded, outbox) -> None:
    seeded([("t1", 5, JAN)])
    aggregate_daily_job(session_factory, DAY_PAYLOAD)
    aggregate_daily_job(session_factory, DAY_PAYLOAD)
    assert [e["total"] for e in outbox(USAGE_AGGREGATED)] == [5]
    assert count(session_factory, UsageAggregate) == 1


def test_a_rerun_after_late_events_emits_one_event_with_the_new_total(
    session_factory, seeded, outbox
) -> None:
    seeded([("t1", 5, JAN)])
    aggregate_daily_job(session_factory, DAY_PAYLOAD)
    seeded([("t1", 3, JAN + timedelta(hours=5))])  # arrives late
    aggregate_daily_job(session_factory, DAY_PAYLOAD)
    aggregate_daily_job(session_factory, DAY_PAYLOAD)
    found = outbox(USAGE_AGGREGATED)
    assert [e["total"] for e in found] == [5, 8]
    assert len({e["id"] for e in found}) == 2


def test_a_day_start_inside_the_day_or_with_an_offset_means_that_utc_day(
    session_factory, seeded, outbox
) -> None:
    seeded([("t1", 5, JAN + timedelta(hours=3))])
    payload = {**DAY_PAYLOAD, "day_start": "2025-01-01T14:30:00+02:00"}
    assert aggregate_daily_job(session_factory, payload) == 5
    assert outbox(USAGE_AGGREGATED)[0]["day_start"] == "2025-01-01T00:00:00+00:00"


def test_the_aggregate_is_not_kept_when_its_event_cannot_be_written(
    session_factory, seeded
) -> None:
    class BrokenOutbox:
        def publish(self, session, topic, payload, *, event_id=None):
            raise RuntimeError("outbox down")

    seeded([("t1", 5, JAN)])
    with pytest.raises(RuntimeError, match="outbox down"):
        aggregate_daily_job(session_factory, DAY_PAYLOAD, webhooks=BrokenOutbox())
    assert count(session_factory, UsageAggregate) == 0


@pytest.mark.parametrize(
    "broken",
    [
        {"metric": "tokens", "day_start": "2025-01-01T00:00:00+00:00"},
        {**DAY_PAYLOAD, "tenant_id": ""},
        {**DAY_PAYLOAD, "metric": "   "},
        {**DAY_PAYLOAD, "tenant_id": 17},
        {**DAY_PAYLOAD, "day_start": "2025-01-01T00:00:00"},
        {**DAY_PAYLOAD, "day_start": 1735689600},
        {**DAY_PAYLOAD, "day_start": "yesterday"},
        {**DAY_PAYLOAD, "extra": 1},
        ["t1", "tokens"],
    ],
    ids=["missing", "empty", "blank", "int", "naive", "epoch", "garbage", "extra", "list"],
)
def test_a_broken_aggregate_payload_runs_nothing(session_factory, seeded, broken, caplog) -> None:
    seeded([("t1", 5, JAN)])
    with pytest.raises(InvalidPayloadError) as raised:
        aggregate_daily_job(session_factory, broken)
    assert raised.value.job == "billing.aggregate_daily"
    assert count(session_factory, UsageAggregate) == 0
    assert count(session_factory, WebhookEvent) == 0
    assert "billing.aggregate_daily not run" in caplog.text


def test_invoice_job_creates_one_invoice_and_one_event(session_factory, seeded, outbox) -> None:
    seeded([("t1", 250, JAN + timedelta(days=3))], plan_for=("t1",))
    invoice_id = generate_monthly_invoice_job(session_factory, INVOICE_PAYLOAD)
    again = generate_monthly_invoice_job(session_factory, {**INVOICE_PAYLOAD, "currency": "USD"})
    assert again == invoice_id
    [event] = outbox(INVOICE_CREATED)
    assert event == {
        "id": f"invoice_created_{invoice_id}",
        "tenant_id": "t1",
        "invoice_id": invoice_id,
        "period_start": "2025-01-01T00:00:00+00:00",
        "period_end": "2025-02-01T00:00:00+00:00",
        "currency": "usd",
    }
    with session_factory() as session:
        [invoice] = session.execute(select(Invoice)).scalars()
        assert (invoice.id, invoice.total_amount) == (invoice_id, 1000 + 250)


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in INVOICE_PAYLOAD.items() if k != "currency"},
        {**INVOICE_PAYLOAD, "currency": ""},
        {**INVOICE_PAYLOAD, "period_end": "2025-02-01T00:00:00"},
        {**INVOICE_PAYLOAD, "period_start": None},
    ],
    ids=["missing", "empty", "naive", "null"],
)
def test_a_broken_invoice_payload_runs_nothing(session_factory, seeded, broken) -> None:
    seeded([], plan_for=("t1",))
    with pytest.raises(InvalidPayloadError):
        generate_monthly_invoice_job(session_factory, broken)
    assert count(session_factory, Invoice) == 0


def test_an_invoice_in_a_currency_the_plan_lacks_stores_nothing(session_factory, seeded) -> None:
    seeded([], plan_for=("t1",))
    with pytest.raises(CurrencyMismatchError):
        generate_monthly_invoice_job(session_factory, {**INVOICE_PAYLOAD, "currency": "eur"})
    assert count(session_factory, Invoice) == 0
    assert count(session_factory, WebhookEvent) == 0


def test_the_job_handler_runs_the_same_jobs_by_name(session_factory, seeded, outbox) -> None:
    seeded([("t1", 5, JAN)], plan_for=("t1",))
    handler = make_billing_job_handler(session_factory=session_factory, webhooks=webhooks)
    assert handler("billing.aggregate_daily", DAY_PAYLOAD) == 5
    invoice_id = handler("billing.generate_monthly_invoice", INVOICE_PAYLOAD)
    assert [e["invoice_id"] for e in outbox(INVOICE_CREATED)] == [invoice_id]


def test_the_job_handler_refuses_an_unknown_job(session_factory) -> None:
    handler = make_billing_job_handler(session_factory=session_factory, webhooks=webhooks)
    with pytest.raises(UnknownJobError, match="billing.agregate_daily"):
        handler("billing.agregate_daily", DAY_PAYLOAD)
