"""The workers' `billing` commands: demo, backfills, jobs and run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
from dramatiq import Worker
from sqlalchemy import func, select

from billing.models import Invoice, Plan, Price, Subscription, UsageAggregate
from workers import actors
from workers.broker import QUEUE_NAME, build_broker
from workers.cli import main
from workers.demo import run_demo
from workers.settings import WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)


def test_the_demo_bills_a_month_with_the_real_actors() -> None:
    out = io.StringIO()
    assert run_demo(out=out, now=datetime(2025, 2, 10, tzinfo=UTC)) == 0
    text = out.getvalue()
    assert "474 usage events in 2025-01" in text
    assert "158 billing.aggregate_daily and 3 billing.generate_monthly_invoice" in text
    assert "acme 2025-01 USD 66.38" in text
    assert "globex 2025-01 USD 35.52" in text  # joined on the 15th: 17/31 of the fee
    assert "tokens          9,261,032      18.52" in text
    assert "webhook outbox: 3 billing.invoice.created, 158 billing.usage_aggregated" in text


def test_the_demo_command_runs_without_any_server(capsys) -> None:
    assert main(["demo"]) == 0
    assert capsys.readouterr().out.count("\ninvoice ") == 3


@pytest.fixture
def cli_database(sqlite_engine, monkeypatch):
    """The CLI reads DATABASE_URL: point it at the test's SQLite file."""
    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    return sqlite_engine


@pytest.fixture
def sqlite_factory(cli_database):
    from billing.db import make_session_factory

    return make_session_factory(cli_database)


def count(session_factory, model, *where) -> int:
    with session_factory() as session:
        query = select(func.count()).select_from(model)
        for condition in where:
            query = query.where(condition)
        return session.execute(query).scalar_one()


def seed_usage(session_factory, rows) -> None:
    from billing import BillingService

    with session_factory.begin() as session:
        for tenant, metric, at in rows:
            BillingService(session=session, tenant_id=tenant).record_usage(
                metric=metric, amount=3, at=at, idempotency_key=f"{tenant}{metric}{at}"
            )


def test_aggregate_backfill_runs_inline_without_a_broker(
    sqlite_factory, stub_broker, capsys
) -> None:
    seed_usage(
        sqlite_factory,
        [
            ("t1", "tokens", JAN),
            ("t2", "tokens", JAN + timedelta(days=1)),
            ("t2", "calls", JAN + timedelta(days=2)),
            ("t3", "tokens", JAN + timedelta(days=5)),  # outside --to
        ],
    )
    assert main(["aggregate", "--from", "2025-01-01", "--to", "2025-01-03"]) == 0
    captured = capsys.readouterr()
    assert "billing.aggregate_daily 2025-01-01..2025-01-03: ran 3, failed 0" in captured.out
    assert "running the jobs in this process" in captured.err
    assert "[##############################] 3/3" in captured.err
    assert count(sqlite_factory, UsageAggregate) == 3


def test_aggregate_backfill_filters_by_tenant_and_metric(sqlite_factory, capsys) -> None:
    seed_usage(sqlite_factory, [("t1", "tokens", JAN), ("t2", "tokens", JAN), ("t2", "calls", JAN)])
    args = ["aggregate", "--from", "2025-01-01", "--to", "2025-01-01", "--tenant", "t2"]
    assert main([*args, "--metric", "calls", "--inline"]) == 0
    assert count(sqlite_factory, UsageAggregate) == 1
    assert count(sqlite_factory, UsageAggregate, UsageAggregate.metric == "calls") == 1


def test_a_reversed_range_is_refused(cli_database, capsys) -> None:
    assert main(["aggregate", "--from", "2025-01-05", "--to", "2025-01-01"]) == 2


def test_a_malformed_period_is_refused(cli_database, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["invoice", "--period", "2025-13"])
    assert "not a month" in capsys.readouterr().err


def add_plan(session, key, currency):
    plan = Plan(key=key, name=key)
    session.add(plan)
    session.flush()
    session.add(Price(plan_id=plan.id, key=f"{key}-fee", currency=currency, unit_amount=500))
    return plan


def test_invoice_backfill_reports_failures_and_carries_on(
    sqlite_factory, stub_broker, capsys
) -> None:
    with sqlite_factory.begin() as session:
        usd, eur = add_plan(session, "usd", "usd"), add_plan(session, "eur", "eur")
        session.add(Subscription(tenant_id="good", plan_id=usd.id, effective_at=JAN))
        # Two plans in two currencies in one month: the service refuses both invoices.
        session.add(Subscription(tenant_id="mixed", plan_id=usd.id, effective_at=JAN))
        session.add(Subscription(tenant_id="mixed", plan_id=eur.id, effective_at=JAN))
    assert main(["invoice", "--period", "2025-01"]) == 1
    out = capsys.readouterr().out
    assert "billing.generate_monthly_invoice 2025-01: ran 3, failed 2" in out
    assert "mixed: CurrencyMismatchError" in out
    assert count(sqlite_factory, Invoice) == 1
    assert main(["invoice", "--period", "2025-01", "--tenant", "good"]) == 0
    assert count(sqlite_factory, Invoice) == 1  # ran again: still one


@pytest.fixture
def redis_attached():
    """The actors on a RedisBroker over fakeredis, as if REDIS_URL were set."""
    settings = WorkerSettings(namespace="cli")
    broker = build_broker(settings, redis_client=fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    previous = actors.attach(broker, settings=settings)
    yield broker
    actors.attach(previous, settings=actors.settings)


def test_aggregate_backfill_enqueues_when_a_broker_is_configured(
    sqlite_factory, redis_attached, capsys
) -> None:
    seed_usage(sqlite_factory, [("t1", "tokens", JAN), ("t2", "tokens", JAN)])
    assert main(["aggregate", "--from", "2025-01-01", "--to", "2025-01-01"]) == 0
    assert "enqueued 2, failed 0" in capsys.readouterr().out
    assert redis_attached.client.llen(f"cli:{QUEUE_NAME}") == 2
    assert count(sqlite_factory, UsageAggregate) == 0  # the workers will do it


def test_jobs_shows_depths_and_dead_letters(sqlite_factory, redis_attached, capsys) -> None:
    actors.bind(sqlite_factory)
    worker = Worker(redis_attached, worker_timeout=20, worker_threads=1)
    worker.start()
    try:
        actors.aggregate_daily.send({"tenant_id": "t1", "metric": "tokens"})  # no day_start
        redis_attached.join(QUEUE_NAME, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        actors.unbind()
    actors.enqueue_aggregate_daily(tenant_id="t9", metric="tokens", day_start=JAN)
    assert main(["jobs"]) == 0
    out = capsys.readouterr().out
    assert "ready        1" in out
    assert "dead letters 1" in out
    assert "billing.aggregate_daily" in out
    assert '"tenant_id": "t1"' in out


def test_jobs_without_a_broker_says_where_the_queue_is(stub_broker, capsys) -> None:
    assert main(["jobs"]) == 0
    assert "in-process" in capsys.readouterr().out


def test_billing_run_aggregates_on_start_and_stops_on_sigterm(sqlite_factory, cli_database) -> None:
    day_before_yesterday = datetime.now(UTC).replace(hour=12) - timedelta(days=2)
    seed_usage(sqlite_factory, [("t1", "tokens", day_before_yesterday)])
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")}
    env["DATABASE_URL"] = cli_database.url.render_as_string(hide_password=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "run", "--threads", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while count(sqlite_factory, UsageAggregate) == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert count(sqlite_factory, UsageAggregate) == 1
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "billing run: stopped" in output


def test_the_procfile_worker_line_uses_the_settings_defaults() -> None:
    from pathlib import Path

    procfile = (Path(__file__).resolve().parents[3] / "Procfile").read_text()
    defaults = WorkerSettings()
    worker = next(line for line in procfile.splitlines() if line.startswith("worker:"))
    assert worker.startswith("worker: dramatiq workers.actors ")
    assert f"${{WORKER_PROCESSES:-{defaults.worker_processes}}}" in worker
    assert f"${{WORKER_THREADS:-{defaults.worker_threads}}}" in worker
    assert "scheduler: python -m workers.scheduler" in procfile
