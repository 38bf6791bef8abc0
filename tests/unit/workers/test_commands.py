"""The workers' `billing` commands: demo, backfills, jobs and run."""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import fakeredis
import httpx
import pytest
from dramatiq import Worker
from sqlalchemy import func, insert, select

from billing.models import Invoice, Plan, Price, Subscription, UsageAggregate
from webhooks import WebhookVerificationError, verify
from webhooks.models import WebhookEvent
from webhooks.secrets import generate_secret
from webhooks.subscriptions import SqlWebhookSubscriptions
from workers import actors
from workers.broker import QUEUE_NAME, build_broker
from workers.cli import main
from workers.demo import run_demo
from workers.queues import DeadLetter, QueueStats, print_stats
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
    assert (
        "webhook outbox: 3 billing.invoice.created, 3 billing.invoice.finalized, "
        "158 billing.usage_aggregated"
    ) in text


def test_the_demo_command_runs_without_any_server(capsys) -> None:
    assert main(["demo"]) == 0
    assert capsys.readouterr().out.count("\ninvoice ") == 3


def test_the_demo_says_its_database_is_gone_and_where_billing_run_writes(
    capsys, monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://billing:s3cret@db.internal/billing")
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "(a throwaway SQLite database, in-process broker" in out
    assert out.endswith(
        "`billing run` starts on DATABASE_URL (postgresql://billing:***@db.internal/billing)\n"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


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
    assert "3/3" not in captured.err  # no progress bar when stderr is not a terminal
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


def add_broken_plan(session, currency):
    """A tiered price without tiers, stored before prices were checked (so not through the
    ORM, which refuses it now): the service can't price it, for any tenant."""
    broken = Plan(key="broken", name="broken")
    session.add(broken)
    session.flush()
    session.execute(
        insert(Price).values(
            id=f"broken-{currency}",
            plan_id=broken.id,
            key="broken-calls",
            currency=currency,
            metric="calls",
            billing_scheme="tiered",
            tiers_mode="volume",
            tiers=None,
            created_at=JAN,
        )
    )
    return broken


def test_invoice_backfill_reports_failures_and_carries_on(
    sqlite_factory, stub_broker, capsys
) -> None:
    with sqlite_factory.begin() as session:
        usd, eur = add_plan(session, "usd", "usd"), add_plan(session, "eur", "eur")
        session.add(Subscription(tenant_id="good", plan_id=usd.id, effective_at=JAN))
        broken = add_broken_plan(session, "eur")
        switch = JAN + timedelta(days=15)  # from the euro plan to the broken one mid-month
        session.add(
            Subscription(tenant_id="mixed", plan_id=eur.id, effective_at=JAN, ended_at=switch)
        )
        session.add(Subscription(tenant_id="mixed", plan_id=broken.id, effective_at=switch))
    assert main(["invoice", "--period", "2025-01"]) == 1
    out = capsys.readouterr().out
    assert "billing.generate_monthly_invoice 2025-01: ran 2, failed 1" in out
    assert "mixed: PriceDefinitionError" in out
    assert count(sqlite_factory, Invoice) == 1
    assert main(["invoice", "--period", "2025-01", "--tenant", "good"]) == 0
    assert count(sqlite_factory, Invoice) == 1  # ran again: still one


def test_untrusted_text_in_a_backfill_failure_is_printed_escaped(
    sqlite_factory, stub_broker, capsys
) -> None:
    tenant = "evil\nbilling.generate_monthly_invoice 2025-01: ran 9, failed 0\x1b[2J"
    with sqlite_factory.begin() as session:
        broken = add_broken_plan(session, "usd")
        session.add(Subscription(tenant_id=tenant, plan_id=broken.id, effective_at=JAN))
    assert main(["invoice", "--period", "2025-01"]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "  evil\\nbilling.generate_monthly_invoice 2025-01: ran 9, failed 0\\x1b[2J:" in out
    assert out.count("\n") == 2  # the summary and the one failure


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
    depths_header, _, depths, letters_header, _, letter = out.splitlines()
    assert depths_header.split() == [
        "queue", "broker", "ready", "in", "progress", "retry", "wait", "dead", "letters"
    ]  # fmt: skip
    assert depths.split() == ["billing", "redis", "1", "0", "0", "1"]
    assert letters_header.split()[:4] == ["dead", "since", "job", "id"]
    assert "billing.aggregate_daily" in letter
    assert '"tenant_id": "t1"' in letter
    assert main(["jobs", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["ready"], stats["dead"]) == (1, 1)
    assert stats["dead_letters"][0]["args"] == [{"tenant_id": "t1", "metric": "tokens"}]


def test_jobs_prints_dead_letters_escaped() -> None:
    letter = DeadLetter(
        message_id="m1",
        actor_name="billing.aggregate_daily",
        args=[{"tenant_id": "t1", "metric": "tok\u202eens"}],
        retries=0,
        dead_since=JAN,
        last_error="InvalidPayloadError: bad\n2025-01-01 forged\x1b[31m",
    )
    out = io.StringIO()
    print_stats(QueueStats("redis", 0, 0, 0, 1, [letter]), as_json=False, out=out)
    text = out.getvalue().rstrip()
    assert len(text.splitlines()) == 6
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert 'tok\\u202eens"' in text
    assert text.endswith("bad\\n2025-01-01 forged\\x1b[31m")


def test_jobs_without_a_broker_says_where_the_queue_is(stub_broker, capsys) -> None:
    assert main(["jobs"]) == 0
    assert "in-process" in capsys.readouterr().out


class _Subscriber(http.server.BaseHTTPRequestHandler):
    """Verifies each delivery with `webhooks.verify` and keeps its id and data."""

    secret = ""
    received: list[tuple[str, dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        try:
            event = verify(body, dict(self.headers), self.secret)
        except WebhookVerificationError:
            self.send_response(400)
        else:
            self.received.append((self.headers["webhook-id"], event["data"]))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.1)
    return result


def test_billing_run_aggregates_delivers_serves_the_api_and_stops_on_sigterm(
    sqlite_factory, cli_database, tmp_path
) -> None:
    day_before_yesterday = datetime.now(UTC).replace(hour=12) - timedelta(days=2)
    seed_usage(sqlite_factory, [("t1", "tokens", day_before_yesterday)])
    _Subscriber.secret, _Subscriber.received = generate_secret(), []
    subscriber = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Subscriber)
    threading.Thread(target=subscriber.serve_forever, daemon=True).start()
    with sqlite_factory.begin() as session:
        url = f"http://127.0.0.1:{subscriber.server_address[1]}/hook"
        SqlWebhookSubscriptions(session).add("billing.usage_aggregated", url, _Subscriber.secret)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")}
    env["DATABASE_URL"] = cli_database.url.render_as_string(hide_password=False)
    env["WEBHOOKS_POLL_INTERVAL"] = "0.1"
    log = tmp_path / "run.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "run", "--threads", "2", "--web-port", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        # The catch-up aggregates the day; its event reaches the subscriber through the relay.
        wait_for(lambda: _Subscriber.received, what="a delivery")
        [(event_id, data)] = _Subscriber.received
        with sqlite_factory() as session:
            assert session.scalars(select(WebhookEvent.id)).all() == [event_id]
        assert (data["tenant_id"], data["metric"], data["total"]) == ("t1", "tokens", 3)
        assert count(sqlite_factory, UsageAggregate) == 1
        banner = wait_for(
            lambda: re.search(r"web API on (http://127\.0\.0\.1:\d+)", log.read_text()),
            what="the web API banner",
        )
        base = banner[1]
        assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
        delivered = wait_for(
            lambda: (
                'webhooks_deliveries_total{outcome="delivered"} 1.0'
                in httpx.get(f"{base}/metrics", timeout=5).text
            ),
            what="the delivery in /metrics",
        )
        assert delivered
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        subscriber.shutdown()
        subscriber.server_close()
    output = log.read_text()
    assert process.returncode == 0, output
    assert "billing run: webhook relay" in output
    assert "billing run: stopped" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_billing_run_stops_and_says_so_when_the_web_port_is_taken(cli_database) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL")}
    env["DATABASE_URL"] = cli_database.url.render_as_string(hide_password=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "workers.cli", "run", "--web-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"the web API could not listen on 127.0.0.1:{port}" in done.stderr


def test_the_web_server_reports_a_port_it_cannot_listen_on() -> None:
    from fastapi import FastAPI

    from workers.webserver import WebServer, WebServerError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(WebServerError, match="could not listen"):
            WebServer(FastAPI(), "127.0.0.1", taken.getsockname()[1]).start()


def test_the_procfile_worker_line_uses_the_settings_defaults() -> None:
    from pathlib import Path

    procfile = (Path(__file__).resolve().parents[3] / "Procfile").read_text()
    defaults = WorkerSettings()
    worker = next(line for line in procfile.splitlines() if line.startswith("worker:"))
    metrics = "env PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-/tmp/billing-metrics}"
    assert worker.startswith(f"worker: {metrics} dramatiq workers.actors ")
    assert f"${{WORKER_PROCESSES:-{defaults.worker_processes}}}" in worker
    assert f"${{WORKER_THREADS:-{defaults.worker_threads}}}" in worker
    assert f"scheduler: {metrics} python -m workers.scheduler" in procfile
