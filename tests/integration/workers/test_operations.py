"""Operating it on PostgreSQL and Redis: invoice sync through a provider outage, JSON logs,
the scheduler's metrics port, and `billing status`, with the Procfile's processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import pytest
from dramatiq import Worker
from sqlalchemy import select

from billing.models import Invoice
from tests.processes import ROOT, free_port, procfile_command, wait_until
from webhooks.models import WebhookSubscription
from workers import actors
from workers.broker import QUEUE_NAME, build_broker
from workers.cli import main
from workers.settings import WorkerSettings
from workers.status import collect_status

from .test_processes import invoiced_month, seed_subscriptions

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PROVIDER = "tests.integration.workers.fake_provider:factory"


def provider_ids(factory) -> list[str | None]:
    with factory() as session:
        return [i.provider_invoice_id for i in session.scalars(select(Invoice))]


def json_lines(text: str) -> list[dict]:
    """The JSON log records of a process's output (dramatiq's own banner lines are text)."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


@pytest.mark.slow
def test_invoices_reach_the_provider_through_an_outage_with_json_logs_and_metrics(
    spawn, base_env, pg_factory, pg_url
) -> None:
    start, _end = invoiced_month()
    seed_subscriptions(pg_factory, ["t1", "t2"], start)
    port = free_port()
    env = {
        **base_env,
        "PROVIDER_SYNC": PROVIDER,
        "LOG_FORMAT": "json",
        "JOB_MIN_BACKOFF": "0.2",
        "SYNC_MAX_BACKOFF": "1",
        "SCHEDULER_METRICS_PORT": str(port),
    }
    worker = spawn("worker", procfile_command("worker"), env)
    scheduler = spawn("scheduler", procfile_command("scheduler"), env)

    def all_synced() -> bool:
        ids = provider_ids(pg_factory)
        return len(ids) == 2 and None not in ids

    wait_until(all_synced, timeout=60, what="both invoices synced past the provider's failure")
    with pg_factory() as session:
        for invoice in session.scalars(select(Invoice)):
            assert invoice.provider_invoice_id == f"prov_{invoice.id}"
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert (
        'billing_scheduler_fires_total{job="billing.monthly-invoices",outcome="enqueued"} 1.0'
        in body
    )
    assert 'billing_scheduler_enqueued_total{job="billing.monthly-invoices"} 2.0' in body
    assert 'job="billing.sync-pending-invoices"' in body  # the sweep is on with PROVIDER_SYNC

    status = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", "--json"],
        cwd=ROOT,
        env={**env, "DATABASE_URL": pg_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads(status.stdout)
    assert report["sync"] == {"unsynced": 0, "overdue": 0}
    assert report["queues"][0]["dead"] == 0
    assert report["invoice_run"]["missing"] == 0
    assert status.returncode == 0, report["problems"]

    for process in (scheduler, worker):
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.output()
    syncs = [r for r in json_lines(worker.output()) if r.get("job") == "billing.sync_invoice"]
    assert sorted(r["outcome"] for r in syncs) == ["failed", "failed", "ok", "ok"]
    ok = [r for r in syncs if r["outcome"] == "ok"]
    assert {r["tenant_id"] for r in ok} == {"t1", "t2"}
    assert all(r["message_id"] and r["retries"] == 1 and r["duration_ms"] >= 0 for r in ok)
    invoices = [
        r for r in json_lines(worker.output()) if r.get("job") == "billing.generate_monthly_invoice"
    ]
    assert [r["sync"] for r in invoices] == ["enqueued", "enqueued"]
    assert any(r["logger"] == "workers.scheduler" for r in json_lines(scheduler.output()))


def test_status_on_postgresql_and_redis_reports_dead_letters_and_disabled_subscriptions(
    pg_factory, pg_url, redis_url, namespace, monkeypatch, capsys
) -> None:
    settings = WorkerSettings(redis_url=redis_url, namespace=namespace)
    broker = build_broker(settings)
    previous = actors.attach(broker, settings=settings)
    try:
        actors.bind(pg_factory)
        worker = Worker(broker, worker_timeout=50, worker_threads=1)
        worker.start()
        try:
            actors.sync_invoice.send({"invoice_id": ""})  # refused: dead-lettered at once
            broker.join(QUEUE_NAME, timeout=10_000)
            worker.join()
        finally:
            worker.stop()
            actors.unbind()
        with pg_factory.begin() as session:
            session.add(
                WebhookSubscription(
                    topic="billing.invoice.created",
                    url="https://gone.test/hook",
                    secret="whsec_x",
                    enabled=False,
                    disabled_reason="410 Gone",
                )
            )
        report = collect_status(pg_factory, settings, broker)
        [queue] = report.queues
        assert (report.broker, queue.dead, queue.dead_recent) == ("redis", 1, 1)
        assert [d.reason for d in report.outbox.disabled] == ["410 Gone"]
        monkeypatch.setenv("DATABASE_URL", pg_url)
        assert main(["status"]) == 1
        out = capsys.readouterr().out
        assert "NEEDS ATTENTION (3)" in out
        assert "queue billing: 1 message(s) dead-lettered in the last 24 h" in out
        # ... and the dead letter itself, with why it died (kept on Redis too).
        assert "billing.sync_invoice is dead (message " in out  # no id in the payload: none named
        assert "invoice_id: String should have at least 1 character" in out
        assert "is disabled: 410 Gone" in out
    finally:
        actors.attach(previous, settings=actors.settings)
        broker.client.close()
