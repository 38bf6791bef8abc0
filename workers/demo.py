"""`billing demo`: a month of billing in a few seconds, with no server.

A throwaway SQLite database, the in-process broker and real Dramatiq worker threads: a plan with
a fixed monthly fee and two usage prices, three tenants using it through last month, then the
scheduler's own fan-outs enqueue the daily aggregations and the monthly invoices, the actors run
them, and the invoices and outbox events they produced are printed.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TextIO

from dramatiq import Worker
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService
from billing.db import make_engine, make_session_factory, redact_url
from billing.migrate import upgrade
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from billing.settings import DEFAULT_DATABASE_URL
from webhooks.models import WebhookEvent
from workers import actors
from workers.broker import QUEUE_NAME, build_broker
from workers.locks import LocalFireLock
from workers.scheduler import BillingScheduler, previous_month
from workers.settings import WorkerSettings

TENANTS = {"acme": 0, "globex": 14, "initech": 0}
"""Demo tenants and the day of the month their subscription starts (globex joins mid-month)."""

JOIN_TIMEOUT_MS = 60_000


def seed(session_factory: sessionmaker[Session], start: datetime, end: datetime) -> int:
    """The demo plan, subscriptions and a month of usage; returns the number of usage events."""
    rng = random.Random(2025)
    recorded = 0
    with session_factory.begin() as session:
        plan = Plan(key="demo-pro", name="Pro", description="29.00 a month plus usage")
        session.add(plan)
        session.flush()
        session.add_all(
            [
                Price(
                    plan_id=plan.id,
                    key="demo-pro-fee",
                    currency="usd",
                    unit_amount=2900,
                    recurring_interval="month",
                ),
                Price(
                    plan_id=plan.id,
                    key="demo-pro-tokens",
                    currency="usd",
                    metric="tokens",
                    unit_amount_decimal=Decimal("0.0002"),
                ),
                Price(
                    plan_id=plan.id,
                    key="demo-pro-calls",
                    currency="usd",
                    metric="api_calls",
                    unit_amount=1,
                ),
            ]
        )
        for tenant, first_day in TENANTS.items():
            session.add(
                Subscription(
                    tenant_id=tenant,
                    plan_id=plan.id,
                    effective_at=start + timedelta(days=first_day),
                )
            )
    for tenant, first_day in TENANTS.items():
        events = []
        day = start + timedelta(days=first_day)
        while day < end:
            for n in range(3):
                at = day + timedelta(hours=rng.randrange(24), minutes=rng.randrange(60))
                events.append(
                    {
                        "metric": "tokens",
                        "amount": rng.randrange(1_000, 200_000),
                        "at": at,
                        "idempotency_key": f"{tenant}-tokens-{day.date()}-{n}",
                    }
                )
                events.append(
                    {
                        "metric": "api_calls",
                        "amount": rng.randrange(1, 40),
                        "at": at,
                        "idempotency_key": f"{tenant}-calls-{day.date()}-{n}",
                    }
                )
            day += timedelta(days=1)
        with session_factory.begin() as session:
            BillingService(session=session, tenant_id=tenant).record_usage_batch(events)
        recorded += len(events)
    return recorded


def run_demo(
    *, out: TextIO, now: datetime | None = None, database_url: str = DEFAULT_DATABASE_URL
) -> int:
    """Run the demo for the month before `now` in a throwaway database and print what it
    produced, ending with where `billing run` writes instead (`database_url`)."""
    started = time.monotonic()
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the demo prints its own summary
    try:
        return _run_demo(out, now or datetime.now(UTC), started, database_url)
    finally:
        quiet.setLevel(level)


def _run_demo(out: TextIO, now: datetime, started: float, database_url: str) -> int:
    start, end = previous_month(now)
    settings = WorkerSettings(broker_url="stub://")
    with tempfile.TemporaryDirectory(prefix="billing-demo-") as folder:
        engine = make_engine(f"sqlite:///{Path(folder) / 'demo.sqlite3'}")
        upgrade(engine)
        session_factory = make_session_factory(engine)
        broker = build_broker(settings)
        previous = actors.attach(broker, settings=settings)
        actors.bind(session_factory)
        # One thread: SQLite has a single writer (see workers.embedded).
        worker = Worker(broker, worker_threads=1, worker_timeout=50)
        worker.start()
        try:
            events = seed(session_factory, start, end)
            print(
                f"billing demo: {len(TENANTS)} tenants recorded {events} usage events in "
                f"{start:%Y-%m} (a throwaway SQLite database, in-process broker, a Dramatiq "
                "worker thread)",
                file=out,
            )
            scheduler = BillingScheduler(settings, session_factory, LocalFireLock())
            days = [start + timedelta(days=n) for n in range((end - start).days)]
            sent = scheduler.fan_out_days(days)
            broker.join(QUEUE_NAME, timeout=JOIN_TIMEOUT_MS)
            worker.join()
            report = scheduler.run_monthly(end + timedelta(minutes=30))
            broker.join(QUEUE_NAME, timeout=JOIN_TIMEOUT_MS)
            worker.join()
            print(
                f"scheduler: {sent} billing.aggregate_daily and {report.enqueued} "
                f"billing.generate_monthly_invoice messages, all processed",
                file=out,
            )
            print_invoices(session_factory, out)
            print_outbox(session_factory, out)
        finally:
            worker.stop()
            actors.unbind()
            actors.attach(previous, settings=actors.settings)
            engine.dispose()
    print(f"done in {time.monotonic() - started:.1f} s", file=out)
    print(
        f"The demo's database was a throwaway and is gone; `billing run` starts on DATABASE_URL "
        f"({redact_url(database_url)})",
        file=out,
    )
    return 0


def money(minor: int) -> str:
    """`123456` cents as `1,234.56`."""
    return f"{Decimal(minor) / 100:,.2f}"


def print_invoices(session_factory: sessionmaker[Session], out: TextIO) -> None:
    """Each invoice with its lines."""
    with session_factory() as session:
        invoices = session.execute(select(Invoice).order_by(Invoice.tenant_id)).scalars().all()
        for invoice in invoices:
            print(
                f"\ninvoice {invoice.id} {invoice.tenant_id} {invoice.period_start:%Y-%m} "
                f"{invoice.currency.upper()} {money(invoice.total_amount)} ({invoice.status})",
                file=out,
            )
            lines = session.execute(
                select(InvoiceLine)
                .where(InvoiceLine.invoice_id == invoice.id)
                .order_by(InvoiceLine.metric.is_not(None), InvoiceLine.metric)
            ).scalars()
            for line in lines:
                label = line.metric or "monthly fee"
                print(f"  {label:<12} {line.quantity:>12,} {money(line.amount):>10}", file=out)


def print_outbox(session_factory: sessionmaker[Session], out: TextIO) -> None:
    """How many events of each topic wait in the webhook outbox."""
    with session_factory() as session:
        rows = session.execute(
            select(WebhookEvent.topic, func.count()).group_by(WebhookEvent.topic)
        ).all()
    counts = ", ".join(f"{count} {topic}" for topic, count in sorted(rows))
    print(f"\nwebhook outbox: {counts}", file=out)
