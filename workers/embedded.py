"""`billing run`: the whole system in one process.

On the embedded default (no `DATABASE_URL`, no broker URL) that is a SQLite file, the in-process
`StubBroker`, Dramatiq worker threads and the APScheduler schedule in a background thread, plus
the companions (webhook relay, web API) started by `start_companions`. Set `DATABASE_URL` and
`REDIS_URL` and the same command runs against PostgreSQL and Redis.

With the in-process broker, messages still queued when the process stops are gone; the next
start's catch-up enqueues the latest fires again (the jobs are idempotent), so nothing the
schedule owes is lost.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from datetime import UTC
from types import FrameType
from typing import Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from dramatiq import Broker, Worker
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from billing.db import make_engine, make_session_factory
from billing.migrate import upgrade
from billing.settings import BillingSettings
from workers.broker import QUEUE_NAME, is_in_process, ms
from workers.provider import load_provider_sync
from workers.scheduler import BillingScheduler, make_lock
from workers.settings import WorkerSettings

logger = logging.getLogger(__name__)


class Companion(Protocol):
    """Something `billing run` starts beside the workers and stops on the way out."""

    name: str

    def stop(self) -> None:
        """Stop, finishing or handing back the work in hand."""
        ...


@dataclass
class EmbeddedSystem:
    """The running parts of `billing run`."""

    settings: WorkerSettings
    engine: Engine
    session_factory: sessionmaker[Session]
    broker: Broker
    worker: Worker
    scheduler: BillingScheduler
    apscheduler: BackgroundScheduler
    companions: list[Companion] = field(default_factory=list)


def start_companions(system: EmbeddedSystem) -> list[Companion]:
    """Start the webhook relay and the web API in this process; return them to stop later.

    This is where `billing run` wires the relay (it delivers `system.session_factory`'s outbox)
    and the `/_billing` web API, once their packages provide an embeddable start function.
    Until then `billing run` runs the workers and the scheduler only.
    """
    return []


def start_embedded(
    settings: WorkerSettings, database: BillingSettings, *, threads: int | None = None
) -> EmbeddedSystem:
    """Migrate the database, then start the workers, the scheduler and the companions.

    `threads` defaults to `WORKER_THREADS`, but to 1 on SQLite: it has a single writer, so more
    threads only make jobs wait on (or fail with) "database is locked" and be retried.
    """
    from workers import actors  # builds the broker from the environment

    engine = make_engine(database.database_url, echo=database.sql_echo)
    upgrade(engine)
    if threads is None:
        threads = 1 if engine.dialect.name == "sqlite" else settings.worker_threads
    session_factory = make_session_factory(engine)
    provider_sync = load_provider_sync(settings.provider_sync) if settings.provider_sync else None
    actors.bind(session_factory, provider_sync=provider_sync)
    worker = Worker(actors.broker, worker_threads=threads)
    worker.start()
    scheduler = BillingScheduler(settings, session_factory, make_lock(settings))
    apscheduler = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(apscheduler)
    apscheduler.start()
    system = EmbeddedSystem(
        settings, engine, session_factory, actors.broker, worker, scheduler, apscheduler
    )
    system.companions = start_companions(system)
    return system


def stop_embedded(system: EmbeddedSystem) -> None:
    """Stop in order: schedule, companions, then the workers (finishing the jobs in hand)."""
    system.scheduler.stop()
    system.apscheduler.shutdown(wait=True)
    for companion in system.companions:
        companion.stop()
    system.worker.stop(timeout=ms(system.settings.job_time_limit.total_seconds()))
    if is_in_process(system.broker):
        left = system.broker.queues[QUEUE_NAME].qsize() if QUEUE_NAME in system.broker.queues else 0
        if left:
            logger.warning("%d queued messages dropped; the next start enqueues them again", left)
    system.engine.dispose()


def run_embedded(
    settings: WorkerSettings, database: BillingSettings, *, threads: int | None = None
) -> int:
    """`billing run`: start everything, wait for SIGTERM or Ctrl-C, stop gracefully."""
    stopping = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    system = start_embedded(settings, database, threads=threads)
    broker_name = "in-process" if is_in_process(system.broker) else type(system.broker).__name__
    print(
        f"billing run: database {system.engine.url.render_as_string(hide_password=True)}, "
        f"{broker_name} broker, {len(system.worker.workers)} worker threads, schedule "
        f"{settings.aggregate_cron!r} / {settings.invoice_cron!r} UTC. Ctrl-C stops.",
        flush=True,
    )
    while not stopping.wait(timeout=1.0):
        pass
    stop_embedded(system)
    print("billing run: stopped", flush=True)
    return 0
