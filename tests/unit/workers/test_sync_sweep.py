"""The scheduler's sweep of unsynced invoices, and the scheduler's Prometheus metrics."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import REGISTRY

from billing.models import Invoice
from tests.processes import free_port, start, wait_until
from workers.locks import LocalFireLock
from workers.scheduler import (
    CATCH_UP_JOB_ID,
    DAILY_JOB_ID,
    MONTHLY_JOB_ID,
    SYNC_JOB_ID,
    BillingScheduler,
    serve_metrics,
)
from workers.settings import WorkerSettings

NOW = datetime(2025, 2, 10, 12, 40, tzinfo=UTC)
SYNCING = WorkerSettings(provider_sync="billing_hooks:stripe_sync")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs) -> None:
        self.calls.append(kwargs)


def make_scheduler(session_factory, settings=SYNCING, lock=None, **kwargs) -> BillingScheduler:
    return BillingScheduler(
        settings,
        session_factory,
        lock or LocalFireLock(),
        send_aggregate=kwargs.pop("send_aggregate", Recorder()),
        send_invoice=kwargs.pop("send_invoice", Recorder()),
        send_sync=kwargs.pop("send_sync", Recorder()),
        now=lambda: NOW,
        sleep=lambda _s: None,
        **kwargs,
    )


def add_invoice(session_factory, tenant: str, age: timedelta, provider_id: str | None = None):
    with session_factory.begin() as session:
        invoice = Invoice(
            tenant_id=tenant,
            period_start=datetime(2025, 1, 1, tzinfo=UTC),
            period_end=datetime(2025, 2, 1, tzinfo=UTC),
            total_amount=1000,
            currency="usd",
            provider_invoice_id=provider_id,
            created_at=NOW - age,
        )
        session.add(invoice)
        session.flush()
        return invoice.id


def test_the_sweep_resends_only_invoices_unsynced_past_the_threshold_within_the_lookback(
    session_factory,
) -> None:
    overdue = add_invoice(session_factory, "t1", timedelta(hours=4))
    add_invoice(session_factory, "t2", timedelta(hours=1))  # its own retries may still run
    add_invoice(session_factory, "t3", timedelta(hours=5), provider_id="in_1")  # synced
    add_invoice(session_factory, "t4", timedelta(days=40))  # before the lookback window
    sent = Recorder()
    report = make_scheduler(session_factory, send_sync=sent).run_sync_sweep()
    assert sent.calls == [{"invoice_id": overdue}]
    assert (report.job_id, report.claimed, report.enqueued) == (SYNC_JOB_ID, True, 1)
    assert report.key == "sync-pending-invoices:2025-02-10T12:15"


def test_two_schedulers_sweep_each_fire_once(session_factory) -> None:
    add_invoice(session_factory, "t1", timedelta(hours=4))
    lock, first, second = LocalFireLock(), Recorder(), Recorder()
    make_scheduler(session_factory, lock=lock, send_sync=first).run_sync_sweep()
    report = make_scheduler(session_factory, lock=lock, send_sync=second).run_sync_sweep()
    assert (len(first.calls), len(second.calls), report.claimed) == (1, 0, False)


def test_a_sweep_fire_is_done_for_a_day(session_factory, clock) -> None:
    add_invoice(session_factory, "t1", timedelta(hours=4))
    lock = LocalFireLock(clock=clock)
    assert make_scheduler(session_factory, lock=lock).run_sync_sweep().claimed
    clock.advance(timedelta(days=1) - timedelta(seconds=1))
    assert not make_scheduler(session_factory, lock=lock).run_sync_sweep().claimed
    clock.advance(timedelta(seconds=1))  # the done marker lasts a day, not FIRE_LOCK_TTL
    assert make_scheduler(session_factory, lock=lock).run_sync_sweep().enqueued == 1


def test_an_invoice_whose_sync_was_never_enqueued_is_sent_by_the_sweep(
    session_factory, seeded
) -> None:
    from workers.jobs import generate_monthly_invoice_job

    seeded([], plan_for=("t1",))

    def broker_down(invoice_id: str) -> None:
        raise ConnectionError("Redis down")

    payload = {
        "tenant_id": "t1",
        "period_start": "2025-01-01T00:00:00+00:00",
        "period_end": "2025-02-01T00:00:00+00:00",
        "currency": "usd",
    }
    with pytest.raises(ConnectionError):
        generate_monthly_invoice_job(session_factory, payload, enqueue_sync=broker_down)
    sent = Recorder()
    later = datetime.now(UTC) + SYNCING.sync_pending_after + timedelta(minutes=1)
    scheduler = make_scheduler(session_factory, send_sync=sent)
    scheduler.now = lambda: later
    scheduler.run_sync_sweep()
    [call] = sent.calls
    with session_factory() as session:
        assert session.get(Invoice, call["invoice_id"]) is not None


def test_the_sweep_is_scheduled_and_caught_up_only_with_a_provider_sync(session_factory) -> None:
    for settings, expected in ((WorkerSettings(), False), (SYNCING, True)):
        apscheduler = BackgroundScheduler(timezone=UTC)
        scheduler = make_scheduler(session_factory, settings=settings)
        scheduler.schedule(apscheduler, catch_up=False)
        assert (apscheduler.get_job(SYNC_JOB_ID) is not None) is expected
        caught_up = {report.job_id for report in scheduler.catch_up()}
        assert caught_up == {DAILY_JOB_ID, MONTHLY_JOB_ID} | ({SYNC_JOB_ID} if expected else set())
    job = apscheduler.get_job(SYNC_JOB_ID)
    assert (job.coalesce, job.max_instances) == (True, 1)
    assert str(job.trigger) == str(scheduler.sync_trigger)
    assert apscheduler.get_job(CATCH_UP_JOB_ID) is None


# --- metrics --------------------------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_fires_and_enqueued_messages_are_counted_by_job_and_outcome(session_factory) -> None:
    add_invoice(session_factory, "t1", timedelta(hours=4))
    add_invoice(session_factory, "t2", timedelta(hours=5))
    fires = "billing_scheduler_fires_total"
    before = {
        outcome: sample(fires, job=SYNC_JOB_ID, outcome=outcome)
        for outcome in ("enqueued", "skipped", "failed")
    }
    enqueued_before = sample("billing_scheduler_enqueued_total", job=SYNC_JOB_ID)
    lock = LocalFireLock()
    assert make_scheduler(session_factory, lock=lock).run_sync_sweep().enqueued == 2
    make_scheduler(session_factory, lock=lock).run_sync_sweep()  # claimed already: skipped

    def broken(**_kwargs) -> None:
        raise RuntimeError("bug in a sender")

    with pytest.raises(RuntimeError):
        make_scheduler(session_factory, send_sync=broken).run_sync_sweep()
    assert sample(fires, job=SYNC_JOB_ID, outcome="enqueued") == before["enqueued"] + 1
    assert sample(fires, job=SYNC_JOB_ID, outcome="skipped") == before["skipped"] + 1
    assert sample(fires, job=SYNC_JOB_ID, outcome="failed") == before["failed"] + 1
    assert sample("billing_scheduler_enqueued_total", job=SYNC_JOB_ID) == enqueued_before + 2
    assert sample("billing_scheduler_last_success_timestamp_seconds", job=SYNC_JOB_ID) > 0


def test_the_scheduler_serves_its_metrics_only_when_a_port_is_set(session_factory, caplog) -> None:
    assert serve_metrics(WorkerSettings()) is False
    port = free_port()
    with caplog.at_level("INFO", logger="workers.scheduler"):
        assert serve_metrics(WorkerSettings(scheduler_metrics_port=port)) is True
    assert [r.getMessage() for r in caplog.records if r.name == "workers.scheduler"] == [
        f"metrics on http://127.0.0.1:{port}/metrics"
    ]
    make_scheduler(session_factory).run_sync_sweep()
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'billing_scheduler_fires_total{job="billing.sync-pending-invoices"' in body
    assert "billing_scheduler_enqueued_total" in body


def test_the_scheduler_serves_its_metrics_on_the_configured_address_only() -> None:
    port = free_port()
    settings = WorkerSettings(scheduler_metrics_port=port, scheduler_metrics_host="127.0.0.2")
    assert serve_metrics(settings) is True
    assert httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_with_a_multiprocess_directory_the_scheduler_serves_the_files_metrics(
    sqlite_engine, tmp_path
) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")},
        "DATABASE_URL": sqlite_engine.url.render_as_string(hide_password=False),
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "SCHEDULER_METRICS_PORT": str(port),
    }
    argv = [sys.executable, "-m", "workers.scheduler"]
    scheduler = start("scheduler", argv, env, tmp_path / "scheduler.log")
    wanted = 'billing_scheduler_fires_total{job="billing.monthly-invoices",outcome="enqueued"} 1.0'

    def scraped() -> str:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.TransportError:  # not listening yet
            return ""

    try:
        wait_until(lambda: wanted in scraped(), 30, what=wanted, interval=0.1)
    finally:
        scheduler.stop(timeout=30)
    assert any(folder.glob("counter_*.db"))  # read from the shared files, not the process
