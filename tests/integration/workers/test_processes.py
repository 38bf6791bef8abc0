"""The Procfile's `worker` (dramatiq) and `scheduler` processes on PostgreSQL and Redis.

Crash, restart and double-scheduler behaviour, with real processes and real signals.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import func, select, text

from billing import BillingService
from billing.models import Invoice, Plan, Price, Subscription, UsageAggregate
from tests.processes import Process, procfile_command, wait_until
from webhooks.models import WebhookEvent
from workers.broker import QUEUE_NAME
from workers.jobs import INVOICE_CREATED, USAGE_AGGREGATED
from workers.scheduler import last_fire_time, previous_month
from workers.settings import WorkerSettings

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def covered_day() -> datetime:
    """A day the scheduler's catch-up aggregates whatever the time of day: two days ago."""
    now = datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2)


def invoiced_month() -> tuple[datetime, datetime]:
    """The month the catch-up invoices: the one before the latest monthly fire."""
    trigger = CronTrigger.from_crontab(WorkerSettings().invoice_cron, timezone=UTC)
    fire = last_fire_time(trigger, datetime.now(UTC))
    assert fire is not None
    return previous_month(fire)


def count(factory, model, *where) -> int:
    with factory() as session:
        query = select(func.count()).select_from(model)
        for condition in where:
            query = query.where(condition)
        return session.execute(query).scalar_one()


def seed_usage(factory, tenants: int, day: datetime, metrics=("tokens",)) -> None:
    with factory.begin() as session:
        for n in range(tenants):
            service = BillingService(session=session, tenant_id=f"t{n:05d}")
            service.record_usage_batch(
                [
                    {
                        "metric": m,
                        "amount": n + 1,
                        "at": day + timedelta(hours=1),
                        "idempotency_key": f"k{n}{m}",
                    }
                    for m in metrics
                ]
            )


def seed_subscriptions(factory, tenants: list[str], start: datetime) -> None:
    with factory.begin() as session:
        plan = Plan(key="it-pro", name="Pro")
        session.add(plan)
        session.flush()
        session.add(
            Price(
                plan_id=plan.id,
                key="it-fee",
                currency="usd",
                unit_amount=1000,
                recurring_interval="month",
            )
        )
        session.add(
            Price(plan_id=plan.id, key="it-tokens", currency="usd", metric="tokens", unit_amount=1)
        )
        for tenant in tenants:
            session.add(
                Subscription(
                    tenant_id=tenant, plan_id=plan.id, effective_at=start - timedelta(days=40)
                )
            )


def queue_keys(namespace: str) -> tuple[str, str]:
    return f"{namespace}:{QUEUE_NAME}", f"{namespace}:{QUEUE_NAME}.msgs"


def test_the_procfile_processes_run_the_whole_cycle(spawn, base_env, pg_factory) -> None:
    day = covered_day()
    start, _end = invoiced_month()
    seed_usage(pg_factory, 20, day)
    seed_subscriptions(pg_factory, ["t00000", "t00001"], start)
    worker = spawn("worker", procfile_command("worker"), base_env)
    scheduler = spawn("scheduler", procfile_command("scheduler"), base_env)
    wait_until(
        lambda: (
            count(pg_factory, WebhookEvent, WebhookEvent.topic == USAGE_AGGREGATED) == 20
            and count(pg_factory, WebhookEvent, WebhookEvent.topic == INVOICE_CREATED) == 2
        ),
        timeout=60,
        what="20 aggregates and 2 invoices announced",
    )
    assert count(pg_factory, UsageAggregate, UsageAggregate.period_start == day) == 20
    assert count(pg_factory, Invoice, Invoice.period_start == start) == 2
    for process in (scheduler, worker):
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.output()


def test_a_worker_killed_mid_invoice_leaves_one_invoice_and_one_event_after_restart(
    spawn, base_env, pg_factory, pg_engine, namespace, redis_url, clients
) -> None:
    env = {**base_env, "HEARTBEAT_TIMEOUT": "2", "WORKER_THREADS": "1"}
    with a_worker_at_the_outbox(spawn, env, pg_factory, pg_engine, redis_url, namespace) as first:
        first.signal(signal.SIGKILL)
        first.wait(timeout=10)
    assert count(pg_factory, Invoice) == 0  # the killed transaction left nothing behind
    spawn("worker", procfile_command("worker"), env)  # the restart
    wait_until(
        lambda: count(pg_factory, WebhookEvent, WebhookEvent.topic == INVOICE_CREATED) == 1,
        timeout=30,
        what="the requeued invoice job to run",
    )
    client = clients(redis.Redis.from_url(redis_url))
    _ready, messages = queue_keys(namespace)
    wait_until(lambda: client.hlen(messages) == 0, timeout=10, what="the message to be acked")
    assert count(pg_factory, Invoice) == 1
    assert count(pg_factory, WebhookEvent, WebhookEvent.topic == INVOICE_CREATED) == 1


@contextlib.contextmanager
def a_worker_at_the_outbox(
    spawn, env, pg_factory, pg_engine, redis_url, namespace
) -> Iterator[Process]:
    """A worker whose job invoicing t1 wrote its invoice and waits on the outbox: the block
    holds `webhook_events` locked, and lets go of it at its end."""
    start, end = invoiced_month()
    seed_subscriptions(pg_factory, ["t1"], start)
    blocker = pg_engine.connect()
    blocker.begin()
    blocker.execute(text("LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE"))
    try:
        enqueue_invoice_on_redis(redis_url, namespace, "t1", start, end)
        worker = spawn("worker", procfile_command("worker"), env)
        wait_until(
            lambda: _waiting_on_lock(pg_engine) >= 1, timeout=30, what="the job to reach the outbox"
        )
        yield worker
    finally:
        blocker.rollback()
        blocker.close()


def enqueue_invoice_on_redis(redis_url, namespace, tenant_id, start, end) -> None:
    """Send one `billing.generate_monthly_invoice` through the real Redis, as a service would."""
    from workers import actors
    from workers.broker import build_broker

    settings = WorkerSettings(redis_url=redis_url, namespace=namespace)
    previous = actors.attach(build_broker(settings), settings=settings)
    try:
        actors.enqueue_generate_monthly_invoice(
            tenant_id=tenant_id, period_start=start, period_end=end, currency="usd"
        )
    finally:
        actors.attach(previous, settings=actors.settings)


def _waiting_on_lock(engine) -> int:
    """Sessions waiting for a lock on `webhook_events` (from `pg_locks`: the statement's text in
    `pg_stat_activity` is cut at 1 KiB, before the outbox part of the invoice's statement)."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND relation = 'webhook_events'::regclass"
            )
        ).scalar_one()


def test_sigterm_lets_the_job_in_hand_finish(
    spawn, base_env, pg_factory, pg_engine, namespace, redis_url, clients
) -> None:
    with a_worker_at_the_outbox(
        spawn, base_env, pg_factory, pg_engine, redis_url, namespace
    ) as worker:
        worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.output()
    assert count(pg_factory, Invoice) == 1
    assert count(pg_factory, WebhookEvent, WebhookEvent.topic == INVOICE_CREATED) == 1
    client = clients(redis.Redis.from_url(redis_url))
    assert client.hlen(queue_keys(namespace)[1]) == 0


def test_two_schedulers_started_together_enqueue_each_fire_once(
    spawn, base_env, pg_factory, namespace, redis_url, clients
) -> None:
    day = covered_day()
    start, _end = invoiced_month()
    seed_usage(pg_factory, 300, day)
    seed_subscriptions(pg_factory, [f"t{n:05d}" for n in range(7)], start)
    schedulers = [spawn("scheduler", procfile_command("scheduler"), base_env) for _ in range(2)]
    client = clients(redis.Redis.from_url(redis_url))
    _ready, messages = queue_keys(namespace)
    wait_until(
        lambda: (
            sum("enqueued" in p.output() or "skipped" in p.output() for p in schedulers) >= 2
            and all(
                p.output().count(" messages in ") + p.output().count("skipped") >= 2
                for p in schedulers
            )
        ),
        timeout=60,
        what="both schedulers to finish their catch-up",
    )
    logs = "".join(p.output() for p in schedulers)
    assert logs.count("enqueued 300 messages") == 1, logs
    assert logs.count("enqueued 7 messages") == 1, logs
    assert logs.count("already claimed by another scheduler run") == 2, logs
    assert client.hlen(messages) == 307
    for process in schedulers:
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_a_redis_restart_while_the_scheduler_runs_loses_nothing(
    spawn, base_env, pg_factory, private_redis, clients
) -> None:
    tenants = 2000
    day = covered_day()
    seed_usage(pg_factory, tenants, day)
    env = {**base_env, "REDIS_URL": private_redis.url}
    client = clients(redis.Redis(port=private_redis.port))
    ready, _messages = queue_keys(env["BROKER_NAMESPACE"])
    scheduler = spawn("scheduler", procfile_command("scheduler"), env)
    wait_until(
        lambda: client.llen(ready) > 0, timeout=30, what="the fan-out to start", interval=0.01
    )
    private_redis.stop()  # in the middle of the fan-out
    wait_until(
        lambda: "broker unreachable" in scheduler.output(),
        timeout=30,
        what="the scheduler to notice",
    )
    private_redis.start()
    worker = spawn("worker", procfile_command("worker"), env)
    wait_until(
        lambda: count(pg_factory, UsageAggregate, UsageAggregate.period_start == day) == tenants,
        timeout=120,
        what="every pair to be aggregated",
    )
    wait_until(
        lambda: count(pg_factory, WebhookEvent, WebhookEvent.topic == USAGE_AGGREGATED) == tenants,
        timeout=30,
        what="every aggregate to be announced",
    )
    assert f"enqueued {tenants} messages" in scheduler.output(), scheduler.output()
    assert client.zcard(f"{env['BROKER_NAMESPACE']}:{QUEUE_NAME}.XQ") == 0  # no dead letters
    for process in (scheduler, worker):
        process.signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
