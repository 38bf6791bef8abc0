"""`billing run`: the whole system in one process.

On the embedded default (no `DATABASE_URL`, no broker URL) that is a SQLite file, the in-process
`StubBroker`, Dramatiq worker threads and the APScheduler schedule in a background thread, plus
the companions started by `start_companions`: the webhook relay (delivering to loopback
addresses too, unless `WEBHOOKS_ALLOW_LOOPBACK` says otherwise) and the web API (`billing.app`:
`/_billing`, `/healthz`, `/metrics`) on 127.0.0.1:8000 by default. Set `DATABASE_URL` and
`REDIS_URL` and the same command runs against PostgreSQL and Redis.

With the in-process broker, messages still queued when the process stops are gone; the next
start's catch-up enqueues the latest fires again (the jobs are idempotent), so nothing the
schedule owes is lost.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from dramatiq import Broker, Worker
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from billing.api.settings import ApiSettings
from billing.db import make_engine, make_session_factory
from billing.migrate import upgrade
from billing.settings import BillingSettings
from webhooks.background import start_relay
from webhooks.settings import WebhookSettings
from webhooks.shutdown import stop_on_signals, wait_for_stop
from workers.broker import QUEUE_NAME, is_in_process, ms
from workers.provider import load_provider_sync
from workers.scheduler import BillingScheduler, deployed_schedule
from workers.settings import WorkerSettings
from workers.webserver import WebServer, WebServerError

logger = logging.getLogger(__name__)


class Companion(Protocol):
    """Something `billing run` starts beside the workers and stops on the way out."""

    name: str

    def stop(self) -> None:
        """Stop, finishing or handing back the work in hand."""
        ...


@dataclass(frozen=True)
class Companions:
    """What `billing run` starts beside the workers: the relay unless `relay` is None, the web
    API on `web_host:web_port` unless `web` is None."""

    relay: WebhookSettings | None = None
    web: ApiSettings | None = None
    web_host: str = "127.0.0.1"
    web_port: int = 8000


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


def embedded_relay_settings(settings: WebhookSettings) -> WebhookSettings:
    """`settings`, delivering to loopback addresses unless `WEBHOOKS_ALLOW_LOOPBACK` was set:
    on one machine the subscriber is often a local process (`billing webhooks listen`)."""
    if "allow_loopback" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"allow_loopback": True})


def start_companions(system: EmbeddedSystem, wanted: Companions) -> list[Companion]:
    """Start the webhook relay (on the system's database) and the web API in this process;
    return them, in start order, to stop later.

    Raises:
        WebServerError: the web API could not listen (the relay started is stopped again).
    """
    from billing.app import create_app

    started: list[Companion] = []
    if wanted.relay is not None:
        started.append(start_relay(wanted.relay, engine=system.engine))
    if wanted.web is not None:
        app = create_app(wanted.web, session_factory=system.session_factory)
        try:
            started.append(WebServer(app, wanted.web_host, wanted.web_port).start())
        except WebServerError:
            for companion in reversed(started):
                companion.stop()
            raise
    return started


def start_embedded(
    settings: WorkerSettings,
    database: BillingSettings,
    *,
    threads: int | None = None,
    companions: Companions = Companions(),
) -> EmbeddedSystem:
    """Migrate the database, then start the workers, the scheduler and the `companions`.

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
    actors.bind(session_factory, provider_sync=provider_sync, policy=database.invoice_policy())
    worker = Worker(actors.broker, worker_threads=threads)
    worker.start()
    scheduler, apscheduler = deployed_schedule(settings, database, session_factory)
    apscheduler.start()
    system = EmbeddedSystem(
        settings, engine, session_factory, actors.broker, worker, scheduler, apscheduler
    )
    try:
        system.companions = start_companions(system, companions)
    except WebServerError:
        stop_embedded(system)
        raise
    return system


def stop_embedded(system: EmbeddedSystem) -> None:
    """Stop in order: schedule, companions (the web API, then the relay), then the workers
    (finishing the jobs in hand)."""
    system.scheduler.stop()
    system.apscheduler.shutdown(wait=True)
    for companion in reversed(system.companions):
        companion.stop()
    system.worker.stop(timeout=ms(system.settings.job_time_limit.total_seconds()))
    if is_in_process(system.broker):
        left = system.broker.queues[QUEUE_NAME].qsize() if QUEUE_NAME in system.broker.queues else 0
        if left:
            logger.warning("%d queued messages dropped; the next start enqueues them again", left)
    system.engine.dispose()


def run_embedded(
    settings: WorkerSettings,
    database: BillingSettings,
    *,
    threads: int | None = None,
    companions: Companions = Companions(),
) -> int:
    """`billing run`: start everything, wait for SIGTERM or Ctrl-C, stop gracefully."""
    stopping = stop_on_signals()
    try:
        system = start_embedded(settings, database, threads=threads, companions=companions)
    except WebServerError as error:
        print(f"billing run: {error}", file=sys.stderr)
        return 1
    broker_name = "in-process" if is_in_process(system.broker) else type(system.broker).__name__
    print(
        f"billing run: database {system.engine.url.render_as_string(hide_password=True)}, "
        f"{broker_name} broker, {len(system.worker.workers)} worker threads, schedule "
        f"{settings.aggregate_cron!r} / {settings.invoice_cron!r} UTC. Ctrl-C stops.",
        flush=True,
    )
    for companion in system.companions:
        where = f" on {companion.url}" if isinstance(companion, WebServer) else ""
        print(f"billing run: {companion.name}{where}", flush=True)
    wait_for_stop(stopping)
    stop_embedded(system)
    print("billing run: stopped", flush=True)
    return 0
