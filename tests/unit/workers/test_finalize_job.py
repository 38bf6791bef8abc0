"""`billing.finalize_invoice`: the job, safe twice; the actor; the scheduler's sweep of drafts
whose grace period has ended; `POST /invoices/{id}/finalize`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import REGISTRY
from sqlalchemy import select

from billing import BillingService, InvoicePolicy
from billing.models import Invoice
from webhooks.models import WebhookEvent
from workers.errors import InvalidPayloadError, InvoiceNotFoundError
from workers.jobs import (
    FINALIZE_INVOICE,
    finalize_invoice_job,
    generate_monthly_invoice_job,
    make_billing_job_handler,
)
from workers.locks import LocalFireLock
from workers.scheduler import FINALIZE_JOB_ID, BillingScheduler
from workers.settings import WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
GRACE = InvoicePolicy(grace_period=timedelta(days=3))
PAYLOAD = {
    "tenant_id": "t1",
    "period_start": JAN.isoformat(),
    "period_end": FEB.isoformat(),
    "currency": "usd",
}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs) -> None:
        self.calls.append(kwargs)


def make_scheduler(session_factory, lock=None, **kwargs) -> BillingScheduler:
    """A scheduler whose sends are recorded (`send_finalize` too, unless given)."""
    kwargs.setdefault("send_finalize", Recorder())
    return BillingScheduler(
        WorkerSettings(),
        session_factory,
        lock or LocalFireLock(),
        send_aggregate=Recorder(),
        send_invoice=Recorder(),
        **kwargs,
    )


@pytest.fixture
def draft(session_factory, seeded) -> str:
    seeded([], plan_for=("t1",))
    synced: list[str] = []
    invoice_id = generate_monthly_invoice_job(
        session_factory, PAYLOAD, policy=GRACE, enqueue_sync=synced.append
    )
    assert synced == []  # a draft is not sent to the provider
    return invoice_id


def finalized_events(session_factory) -> list[dict]:
    with session_factory() as session:
        rows = session.execute(
            select(WebhookEvent.payload).where(WebhookEvent.topic == "billing.invoice.finalized")
        )
        return list(rows.scalars())


def test_the_job_finalizes_a_draft_once_however_often_it_runs(session_factory, draft) -> None:
    synced: list[str] = []
    payload = {"invoice_id": draft}
    assert finalize_invoice_job(session_factory, payload, enqueue_sync=synced.append) == "open"
    assert finalize_invoice_job(session_factory, payload, enqueue_sync=synced.append) == "open"
    assert synced == [draft]
    [event] = finalized_events(session_factory)
    assert (event["invoice_id"], event["number"]) == (draft, "INV-000001")


def test_a_draft_voided_before_its_finalization_stays_void(session_factory, draft) -> None:
    with session_factory.begin() as session:
        BillingService(session=session, tenant_id="t1").void_invoice(draft)
    assert finalize_invoice_job(session_factory, {"invoice_id": draft}) == "void"
    assert finalized_events(session_factory) == []


def test_an_unknown_or_malformed_invoice_id_is_refused(session_factory) -> None:
    with pytest.raises(InvoiceNotFoundError):
        finalize_invoice_job(session_factory, {"invoice_id": "nope"})
    with pytest.raises(InvalidPayloadError):
        finalize_invoice_job(session_factory, {"invoice_id": ""})


def test_the_job_handler_runs_the_finalize_job(session_factory, draft) -> None:
    handler = make_billing_job_handler(session_factory=session_factory)
    assert handler(FINALIZE_INVOICE, {"invoice_id": draft}) == "open"


def test_the_actor_finalizes_a_draft(session_factory, draft, bound, stub_broker, stub_worker):
    from workers import actors

    actors.enqueue_finalize_invoice(invoice_id=draft)
    stub_broker.join(actors.finalize_invoice.queue_name, timeout=10_000)
    stub_worker.join()
    with session_factory() as session:
        assert session.get(Invoice, draft).number == "INV-000001"


def test_the_sweep_sends_only_drafts_past_their_grace_period(session_factory, draft) -> None:
    with session_factory() as session:
        created = session.get(Invoice, draft).created_at
    sent = Recorder()
    scheduler = make_scheduler(
        session_factory,
        send_finalize=sent,
        grace_period=timedelta(days=3),
        now=lambda: created + timedelta(days=3) - timedelta(seconds=1),
        sleep=lambda _s: None,
    )
    assert scheduler.finalizes_drafts
    assert scheduler.run_finalize_sweep().enqueued == 0
    scheduler.now = lambda: created + timedelta(days=3, minutes=20)
    report = scheduler.run_finalize_sweep()
    assert (report.job_id, report.enqueued, sent.calls) == (
        FINALIZE_JOB_ID,
        1,
        [{"invoice_id": draft}],
    )
    finalize_invoice_job(session_factory, {"invoice_id": draft})
    scheduler.now = lambda: created + timedelta(days=3, minutes=40)
    assert scheduler.run_finalize_sweep().enqueued == 0  # finalized: not sent again


def test_without_a_grace_period_no_sweep_is_scheduled(session_factory) -> None:
    assert not make_scheduler(session_factory).finalizes_drafts


def test_each_finalize_sweep_fire_is_claimed_once_for_a_day(session_factory, seeded, clock) -> None:
    seeded([], plan_for=("t1", "t2"))
    drafts = {
        generate_monthly_invoice_job(
            session_factory,
            {**PAYLOAD, "tenant_id": t},
            policy=GRACE,
            enqueue_sync=lambda _id: None,
        )
        for t in ("t1", "t2")
    }
    fire_time = datetime(2025, 2, 9, 7, 20, tzinfo=UTC)
    lock = LocalFireLock(clock=clock)

    def sweep() -> tuple[str, int, list[dict]]:
        sent = Recorder()
        report = make_scheduler(
            session_factory,
            lock,
            send_finalize=sent,
            grace_period=timedelta(days=3),
            now=lambda: datetime.now(UTC) + timedelta(days=4),
            monotonic=clock,
        ).run_finalize_sweep(fire_time)
        return report.key, report.enqueued, sent.calls

    counted = "billing_scheduler_enqueued_total"
    before = REGISTRY.get_sample_value(counted, {"job": FINALIZE_JOB_ID}) or 0.0
    key, enqueued, calls = sweep()
    assert (key, enqueued) == ("finalize-drafts:2025-02-09T07:20", 2)
    assert {call["invoice_id"] for call in calls} == drafts
    assert REGISTRY.get_sample_value(counted, {"job": FINALIZE_JOB_ID}) == before + 2
    clock.advance(timedelta(days=1) - timedelta(seconds=1))
    assert sweep()[1:] == (0, [])  # the same fire, done: skipped
    clock.advance(timedelta(seconds=1))  # its done marker lasts a day, not FIRE_LOCK_TTL
    assert sweep()[1] == 2


def test_with_a_grace_period_the_sweep_is_scheduled_and_caught_up(session_factory) -> None:
    scheduler = make_scheduler(
        session_factory,
        grace_period=timedelta(days=3),
        now=lambda: datetime(2025, 2, 9, 7, 25, tzinfo=UTC),
    )
    aps = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(aps, catch_up=False)
    job = aps.get_job(FINALIZE_JOB_ID)
    assert (str(job.trigger), job.args) == (str(scheduler.finalize_trigger), (FINALIZE_JOB_ID,))
    assert [r.key for r in scheduler.catch_up() if r.job_id == FINALIZE_JOB_ID] == [
        "finalize-drafts:2025-02-09T07:20"
    ]
    scheduler._job(FINALIZE_JOB_ID, datetime(2025, 2, 9, 7, tzinfo=UTC))  # a retry
    assert scheduler.lock.is_done("finalize-drafts:2025-02-09T07:00")
