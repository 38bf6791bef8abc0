"""Fixtures for the workers' unit tests: a StubBroker the actors are attached to, a Worker on it,
the actors bound to the test database, and small data builders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dramatiq import Broker, Worker
from dramatiq.brokers.stub import StubBroker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService
from billing.models import Plan, Price, Subscription
from webhooks.models import WebhookEvent
from workers import actors
from workers.broker import build_broker
from workers.settings import WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)


class FakeClock:
    """A monotonic clock (seconds) that moves only when told to; `sleep` moves it."""

    def __init__(self) -> None:
        self.now = 0.0  # time.monotonic() may be anything, zero included

    def __call__(self) -> float:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta.total_seconds()

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake monotonic clock for leases: pass it as `clock=` / `monotonic=`."""
    return FakeClock()


@pytest.fixture
def worker_settings() -> WorkerSettings:
    """In-process broker, two fast retries (milliseconds apart); five for invoice syncs."""
    return WorkerSettings(
        broker_url="stub://",
        job_max_retries=2,
        job_min_backoff=timedelta(milliseconds=5),
        job_max_backoff=timedelta(milliseconds=20),
        sync_max_retries=5,
        sync_max_backoff=timedelta(milliseconds=20),
    )


@pytest.fixture
def stub_broker(worker_settings: WorkerSettings) -> Iterator[StubBroker]:
    """A fresh StubBroker with the billing middleware; the actors are attached to it."""
    broker = build_broker(worker_settings)
    assert isinstance(broker, StubBroker)
    previous = actors.attach(broker, settings=worker_settings)
    yield broker
    broker.flush_all()
    broker.close()
    actors.attach(previous, settings=actors.settings)


@pytest.fixture
def stub_worker(stub_broker: Broker) -> Iterator[Worker]:
    worker = Worker(stub_broker, worker_timeout=20, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def bound(session_factory: sessionmaker[Session]) -> Iterator[sessionmaker[Session]]:
    """The actors use the test database."""
    actors.bind(session_factory)
    yield session_factory
    actors.unbind()


# --- data ---------------------------------------------------------------------------------


def add_plan(session: Session, key: str = "pro", currencies: tuple[str, ...] = ("usd",)) -> Plan:
    """A plan with, per currency, a fixed monthly fee of 10.00 and 1 cent per token."""
    plan = Plan(key=key, name=key.title())
    session.add(plan)
    session.flush()
    for currency in currencies:
        session.add(
            Price(
                plan_id=plan.id,
                key=f"{key}-fee-{currency}",
                currency=currency,
                unit_amount=1000,
                recurring_interval="month",
            )
        )
        session.add(
            Price(
                plan_id=plan.id,
                key=f"{key}-tokens-{currency}",
                currency=currency,
                metric="tokens",
                unit_amount=1,
            )
        )
    session.flush()
    return plan


def subscribe(
    session: Session,
    tenant: str,
    plan: Plan,
    start: datetime = JAN - timedelta(days=40),
    end: datetime | None = None,
) -> None:
    session.add(Subscription(tenant_id=tenant, plan_id=plan.id, effective_at=start, ended_at=end))
    session.flush()


def use(session: Session, tenant: str, amount: int, at: datetime, metric: str = "tokens") -> None:
    BillingService(session=session, tenant_id=tenant).record_usage(
        metric=metric, amount=amount, at=at, idempotency_key=f"{metric}-{amount}-{at.isoformat()}"
    )


@pytest.fixture
def outbox(session_factory: sessionmaker[Session]) -> Callable[[str], list[dict[str, Any]]]:
    """`outbox(topic)`: the stored events of that topic, oldest first, each with its `id`."""

    def read(topic: str) -> list[dict[str, Any]]:
        with session_factory() as session:
            rows = session.execute(
                select(WebhookEvent)
                .where(WebhookEvent.topic == topic)
                .order_by(WebhookEvent.created_at, WebhookEvent.id)
            ).scalars()
            return [{"id": row.id, **row.payload} for row in rows]

    return read


@pytest.fixture
def seeded(session_factory: sessionmaker[Session]) -> Callable[..., None]:
    """Writes usage (and optionally a plan and subscription) in a committed transaction."""

    def seed(usage: list[tuple[str, int, datetime]], *, plan_for: tuple[str, ...] = ()) -> None:
        with session_factory.begin() as session:
            if plan_for:
                plan = add_plan(session)
                for tenant in plan_for:
                    subscribe(session, tenant, plan)
            for tenant, amount, at in usage:
                use(session, tenant, amount, at)

    return seed
