"""The billing scheduler: `python -m workers.scheduler` (the Procfile's `scheduler` line).

APScheduler 3 runs two cron jobs in UTC, from `WorkerSettings`:

- `billing.aggregate-daily` (`AGGREGATE_CRON`, every hour at :10 by default) enqueues, for the
  tenants of each time zone (`billing.tenants`; UTC for tenants without one),
  `billing.aggregate_daily` for every (tenant, metric) with usage on the zone's local day that
  ended last, and again for the `LATE_EVENT_WINDOW_DAYS` days before it, so late events are
  counted. A zone's day is enqueued by the first fire after it ends there.
- `billing.monthly-invoices` (`INVOICE_CRON`, every hour of the 1st and 2nd at :30) enqueues,
  per zone, `billing.generate_monthly_invoice` for every tenant with a subscription active in
  the zone's local month that ended last, once per currency its plan has prices in.

- `billing.usage-partitions` (`PARTITION_CRON`, 00:05 daily, and on start) creates the monthly
  partitions of `usage_events` for this month and the `PARTITIONS_AHEAD` months after it, and
  moves events that fell into the default partition into their month's (PostgreSQL; see
  `billing.partitions`). It runs in the scheduler itself: DDL, no messages.
- `billing.sync-pending-invoices` (`SYNC_SWEEP_CRON`, hourly; only with `PROVIDER_SYNC`) sends
  `billing.sync_invoice` again for every invoice created in the last `SYNC_LOOKBACK` that still
  has no provider id `SYNC_PENDING_AFTER` after it was created: the safety net under the
  message each invoice job sends after its commit (lost if the broker failed right then, or
  dead-lettered after a long provider outage). It also sends it for synced invoices paid or
  voided in that window that the provider was not told of (the only way a payment or void
  made over HTTP or by a command reaches it).
- `billing.finalize-drafts` (`FINALIZE_SWEEP_CRON`, every 10 minutes; only with an
  `INVOICE_GRACE_PERIOD`) sends `billing.finalize_invoice` for every draft invoice created more
  than the grace period ago (the actor is safe to receive twice).

All have fixed ids, `coalesce=True`, `max_instances=1` and a misfire grace (`MISFIRE_GRACE`).
Each fire is claimed first, per zone, with a fire lock keyed by the work it stands for
(`aggregate-daily:2025-01-31`, `monthly-invoices:2025-01` for UTC;
`aggregate-daily:America/New_York:2025-01-31` for another zone): with two schedulers running,
one enqueues and the other skips, and the hourly fires after the first skip what is done. On
start, the scheduler runs the latest fire of each job unless its key is already claimed: what it
missed while down (the days of the late-event window, the last month's invoices) is enqueued
then.

Sending retries while Redis is unreachable (`ENQUEUE_RETRY_FOR`), so a Redis restart loses
nothing; a fire that still fails, or is interrupted by SIGTERM, gives its claim back and is tried
again a minute later (and at the next start).

The process logs as `LOG_FORMAT` asks and, with `SCHEDULER_METRICS_PORT`, serves the
`workers.metrics` counters (fires by outcome, messages enqueued) on that port.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import dramatiq.errors
import redis
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy.orm import Session, sessionmaker

from billing import tenants
from billing.aggregation import utc_day_start
from billing.localtime import UTC_NAME, local_day, previous_local_day, previous_local_month
from billing.partitions import ensure_partitions
from webhooks.shutdown import stop_on_signals, wait_for_stop
from workers import fanout
from workers.locks import FireLock, LocalFireLock, RedisFireLock
from workers.metrics import SCHEDULER_ENQUEUED, record_fire
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from billing.settings import BillingSettings

logger = logging.getLogger("workers.scheduler")  # also when run as `python -m workers.scheduler`

DAILY_JOB_ID = "billing.aggregate-daily"
MONTHLY_JOB_ID = "billing.monthly-invoices"
CATCH_UP_JOB_ID = "billing.catch-up"
SYNC_JOB_ID = "billing.sync-pending-invoices"
FINALIZE_JOB_ID = "billing.finalize-drafts"
PARTITIONS_JOB_ID = "billing.usage-partitions"
SYNC_FIRE_LOCK_TTL = timedelta(days=1)
RETRY_DELAY = timedelta(minutes=1)
DAY = timedelta(days=1)
EVERYTHING = fanout.Filter()

#: Errors that mean "the broker is unreachable right now": sending is retried.
TRANSIENT_SEND_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    dramatiq.errors.BrokerConnectionError,
)

T = TypeVar("T")
SendAggregate = Callable[..., object]
"""`enqueue_aggregate_daily(*, tenant_id, metric, day_start)`."""
SendInvoice = Callable[..., object]
"""`enqueue_generate_monthly_invoice(*, tenant_id, period_start, period_end, currency)`."""
SendSync = Callable[..., object]
"""`enqueue_sync_invoice(*, invoice_id)`."""
SendFinalize = Callable[..., object]
"""`enqueue_finalize_invoice(*, invoice_id)`."""


class FireBusy(Exception):
    """Another scheduler run holds the fire and has not finished it: look again later."""


class FireInterrupted(Exception):
    """The scheduler is stopping; the fire gave its claim back and will be run again."""


@dataclass(frozen=True)
class FireReport:
    """What one fire did: whether it won the claim, and how many messages it sent."""

    job_id: str
    key: str
    claimed: bool
    enqueued: int = 0
    seconds: float = 0.0
    zones: tuple[FireReport, ...] = ()
    """The same fire for the tenants of the other zones (this report is the UTC one's)."""


def month_start(moment: datetime) -> datetime:
    """Midnight UTC on the first day of the month of `moment`."""
    return utc_day_start(moment).replace(day=1)


def previous_month(moment: datetime) -> tuple[datetime, datetime]:
    """`[start, end)` of the calendar month before the one containing `moment`."""
    end = month_start(moment)
    return month_start(end - DAY), end


def _zone_prefix(zone: str) -> str:
    """The zone's part of a fire key: none for UTC (the keys from before zones existed)."""
    return "" if zone == UTC_NAME else f"{zone}:"


def last_fire_time(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The latest time at or before `now` that `trigger` fires (within 62 days), if any."""
    fire: datetime | None = trigger.get_next_fire_time(None, now - timedelta(days=62))
    last = None
    while fire is not None and fire <= now:
        last = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
    return last


class StoppableScheduler(BackgroundScheduler):  # type: ignore[misc]
    """APScheduler's background scheduler, safe to shut down right after it starts.

    APScheduler 3 removes a finished one-off job (the catch-up run) from its own thread; when
    `shutdown()` lands in the middle of that, it looks for the job among the pending ones,
    finds nothing and raises `JobLookupError` in that thread. The job is gone either way.
    """

    def remove_job(self, job_id: str, jobstore: str | None = None) -> None:
        try:
            super().remove_job(job_id, jobstore)
        except JobLookupError:
            if self.state != STATE_STOPPED:
                raise


class BillingScheduler:
    """The fan-outs and their schedule; collaborators are passed in so tests can swap them."""

    def __init__(
        self,
        settings: WorkerSettings,
        session_factory: sessionmaker[Session],
        lock: FireLock,
        *,
        send_aggregate: SendAggregate | None = None,
        send_invoice: SendInvoice | None = None,
        send_sync: SendSync | None = None,
        send_finalize: SendFinalize | None = None,
        grace_period: timedelta = timedelta(0),
        late_usage_lookback: timedelta | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if send_aggregate is None or send_invoice is None:
            from workers import actors  # the broker the environment configures

            send_aggregate = send_aggregate or actors.enqueue_aggregate_daily
            send_invoice = send_invoice or actors.enqueue_generate_monthly_invoice
        self.settings = settings
        self.session_factory = session_factory
        self.lock = lock
        self.send_aggregate = send_aggregate
        self.send_invoice = send_invoice
        self._send_sync = send_sync
        self._send_finalize = send_finalize
        self.grace_period = grace_period
        self.late_usage_lookback = late_usage_lookback
        self.now = now
        self.sleep = sleep
        self.monotonic = monotonic  # leases, deadlines and backoff: tests pass a fake clock
        self.daily_trigger = CronTrigger.from_crontab(settings.aggregate_cron, timezone=UTC)
        self.monthly_trigger = CronTrigger.from_crontab(settings.invoice_cron, timezone=UTC)
        self.sync_trigger = CronTrigger.from_crontab(settings.sync_sweep_cron, timezone=UTC)
        self.finalize_trigger = CronTrigger.from_crontab(settings.finalize_sweep_cron, timezone=UTC)
        self.partition_trigger = CronTrigger.from_crontab(settings.partition_cron, timezone=UTC)
        self.stopping = threading.Event()
        self._apscheduler: BaseScheduler | None = None
        self._lease = threading.local()  # the fire this thread is fanning out, and when to renew

    # --- the fires ------------------------------------------------------------------------

    def days_to_aggregate(self, fire_time: datetime, zone: str = UTC_NAME) -> list[datetime]:
        """The local midnights (aware, in `zone`) of the day of `zone` that ended last by
        `fire_time`, then of the late-event window's days before it."""
        tz = tenants.zone(zone)
        days = [previous_local_day(tz, fire_time)]
        for _ in range(self.settings.late_event_window_days):
            days.append(previous_local_day(tz, days[-1].start))
        return [day.start.astimezone(tz) for day in days]

    def run_daily(self, fire_time: datetime | None = None) -> FireReport:
        """Enqueue, zone by zone, the aggregation of every (tenant, metric) of the days
        `fire_time` covers there; each (zone, day) once."""
        fire_time = fire_time or self._last_fire(self.daily_trigger)
        return self._per_zone(partial(self._run_daily_in, fire_time))

    def _run_daily_in(self, fire_time: datetime, zone: str) -> FireReport:
        days = self.days_to_aggregate(fire_time, zone)
        key = f"aggregate-daily:{_zone_prefix(zone)}{days[0].date().isoformat()}"
        only = fanout.Filter(zone=zone)
        return self._fire(DAILY_JOB_ID, key, lambda: self.fan_out_days(days, only))

    def run_monthly(self, fire_time: datetime | None = None) -> FireReport:
        """Enqueue, zone by zone, the invoices of the local month that ended last by
        `fire_time`; each (zone, month) once."""
        fire_time = fire_time or self._last_fire(self.monthly_trigger)
        return self._per_zone(partial(self._run_monthly_in, fire_time))

    def _run_monthly_in(self, fire_time: datetime, zone: str) -> FireReport:
        start, end = previous_local_month(tenants.zone(zone), fire_time)
        month = start.astimezone(tenants.zone(zone)).strftime("%Y-%m")
        key = f"monthly-invoices:{_zone_prefix(zone)}{month}"
        only = fanout.Filter(zone=zone)
        return self._fire(MONTHLY_JOB_ID, key, lambda: self.fan_out_invoices(start, end, only))

    def _per_zone(self, run: Callable[[str], FireReport]) -> FireReport:
        """`run` for UTC, then for each other zone tenants are billed in."""
        utc, *others = (run(zone) for zone in fanout.zone_names(self.session_factory))
        return replace(utc, zones=tuple(others))

    def run_sync_sweep(self, fire_time: datetime | None = None) -> FireReport:
        """Send `billing.sync_invoice` again for the invoices still unsynced (`PROVIDER_SYNC`)."""
        fire_time = fire_time or self._last_fire(self.sync_trigger)
        key = f"sync-pending-invoices:{fire_time.strftime('%Y-%m-%dT%H:%M')}"
        return self._fire(SYNC_JOB_ID, key, self.fan_out_unsynced, ttl=SYNC_FIRE_LOCK_TTL)

    def run_finalize_sweep(self, fire_time: datetime | None = None) -> FireReport:
        """Send `billing.finalize_invoice` for the drafts whose grace period has ended."""
        fire_time = fire_time or self._last_fire(self.finalize_trigger)
        key = f"finalize-drafts:{fire_time.strftime('%Y-%m-%dT%H:%M')}"
        return self._fire(FINALIZE_JOB_ID, key, self.fan_out_due_drafts, ttl=SYNC_FIRE_LOCK_TTL)

    def late_since(self) -> datetime | None:
        """The oldest period end whose late usage the invoice fan-out still bills (the clock
        less `LATE_USAGE_LOOKBACK`), or None when late usage is not billed."""
        if self.late_usage_lookback is None:
            return None
        return self.now() - self.late_usage_lookback

    def run_partitions(self) -> list[str]:
        """Create the monthly partitions of `usage_events` ahead; the names created."""
        with self.session_factory.begin() as session:
            created = ensure_partitions(
                session.connection(), now=self.now(), ahead=self.settings.partitions_ahead
            )
        logger.info("%s: created %s", PARTITIONS_JOB_ID, ", ".join(created) or "nothing")
        record_fire(PARTITIONS_JOB_ID, "enqueued")
        return created

    @property
    def finalizes_drafts(self) -> bool:
        """True with an `INVOICE_GRACE_PERIOD`, so the finalize sweep is scheduled."""
        return self.grace_period > timedelta(0)

    @property
    def syncs_invoices(self) -> bool:
        """True when a provider sync is configured, so the sweep is scheduled."""
        return bool(self.settings.provider_sync)

    def catch_up(self) -> list[FireReport]:
        """Run the latest fire of each job unless it was claimed: what a stop made us miss."""
        reports = []
        now = self.now()
        runs: list[tuple[CronTrigger, Callable[[datetime], FireReport]]] = [
            (self.daily_trigger, self.run_daily),
            (self.monthly_trigger, self.run_monthly),
        ]
        if self.syncs_invoices:
            runs.append((self.sync_trigger, self.run_sync_sweep))
        if self.finalizes_drafts:
            runs.append((self.finalize_trigger, self.run_finalize_sweep))
        for trigger, run in runs:
            fire_time = last_fire_time(trigger, now)
            if fire_time is not None:
                reports.append(run(fire_time))
        return reports

    # --- fan-out ----------------------------------------------------------------------------

    def fan_out_days(self, days: Iterable[datetime], only: fanout.Filter = EVERYTHING) -> int:
        """Send `billing.aggregate_daily` for each pair with usage on each day (the day
        containing each instant in `only.zone`, UTC when none is named); the count."""
        sent = 0
        enqueued = SCHEDULER_ENQUEUED.labels(job=DAILY_JOB_ID)
        for day in days:
            stream = fanout.usage_pairs(
                self.session_factory, day, batch_size=self.settings.fanout_batch_size, only=only
            )
            day_start = local_day(only.tz, day).start.astimezone(only.tz)
            with closing(stream):
                for tenant_id, metric in stream:
                    self._check_stopping()
                    self._retrying(
                        partial(
                            self.send_aggregate,
                            tenant_id=tenant_id,
                            metric=metric,
                            day_start=day_start,
                        )
                    )
                    enqueued.inc()
                    sent += 1
        return sent

    def fan_out_invoices(
        self, start: datetime, end: datetime, only: fanout.Filter = EVERYTHING
    ) -> int:
        """Send `billing.generate_monthly_invoice` for each (tenant, currency) due; the count.
        The period is sent with the offset of `only.zone` (UTC when none is named)."""
        sent = 0
        enqueued = SCHEDULER_ENQUEUED.labels(job=MONTHLY_JOB_ID)
        stream = fanout.invoice_targets(
            self.session_factory,
            start,
            end,
            batch_size=self.settings.fanout_batch_size,
            only=only,
            late_since=self.late_since(),
        )
        with closing(stream):
            for tenant_id, currency in stream:
                self._check_stopping()
                send = partial(
                    self.send_invoice,
                    tenant_id=tenant_id,
                    period_start=start.astimezone(only.tz),
                    period_end=end.astimezone(only.tz),
                    currency=currency,
                )
                self._retrying(send)
                enqueued.inc()
                sent += 1
        return sent

    def fan_out_unsynced(self) -> int:
        """Send `billing.sync_invoice` for each invoice unsynced past `SYNC_PENDING_AFTER`."""
        now = self.now()
        send_sync = self.send_sync
        sent = 0
        enqueued = SCHEDULER_ENQUEUED.labels(job=SYNC_JOB_ID)
        stream = fanout.unsynced_invoices(
            self.session_factory,
            now - self.settings.sync_lookback,
            now - self.settings.sync_pending_after,
            batch_size=self.settings.fanout_batch_size,
        )
        with closing(stream):
            for invoice_id, _tenant_id in stream:
                self._check_stopping()
                self._retrying(partial(send_sync, invoice_id=invoice_id))
                enqueued.inc()
                sent += 1
        return sent

    def fan_out_due_drafts(self) -> int:
        """Send `billing.finalize_invoice` for each draft older than the grace period."""
        send_finalize = self.send_finalize
        sent = 0
        enqueued = SCHEDULER_ENQUEUED.labels(job=FINALIZE_JOB_ID)
        stream = fanout.due_drafts(
            self.session_factory,
            self.now() - self.grace_period,
            batch_size=self.settings.fanout_batch_size,
        )
        with closing(stream):
            for invoice_id, _tenant_id in stream:
                self._check_stopping()
                self._retrying(partial(send_finalize, invoice_id=invoice_id))
                enqueued.inc()
                sent += 1
        return sent

    @property
    def send_finalize(self) -> SendFinalize:
        """How draft finalizations are sent (the environment's broker, by default)."""
        if self._send_finalize is None:
            from workers import actors

            self._send_finalize = actors.enqueue_finalize_invoice
        return self._send_finalize

    @property
    def send_sync(self) -> SendSync:
        """How invoice syncs are sent (the broker the environment configures, by default)."""
        if self._send_sync is None:
            from workers import actors

            self._send_sync = actors.enqueue_sync_invoice
        return self._send_sync

    # --- scheduling -------------------------------------------------------------------------

    def schedule(self, scheduler: BaseScheduler, *, catch_up: bool = True) -> None:
        """Add the cron jobs (and, with `catch_up`, a catch-up run right away) to `scheduler`."""
        self._apscheduler = scheduler
        common: dict[str, Any] = {
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": int(self.settings.misfire_grace.total_seconds()),
            "replace_existing": True,
        }
        scheduler.add_job(
            self._job, self.daily_trigger, args=[DAILY_JOB_ID], id=DAILY_JOB_ID, **common
        )
        scheduler.add_job(
            self._job, self.monthly_trigger, args=[MONTHLY_JOB_ID], id=MONTHLY_JOB_ID, **common
        )
        if self.syncs_invoices:
            scheduler.add_job(
                self._job, self.sync_trigger, args=[SYNC_JOB_ID], id=SYNC_JOB_ID, **common
            )
        if self.finalizes_drafts:
            scheduler.add_job(
                self._job,
                self.finalize_trigger,
                args=[FINALIZE_JOB_ID],
                id=FINALIZE_JOB_ID,
                **common,
            )
        partitions = {"args": [PARTITIONS_JOB_ID], "id": PARTITIONS_JOB_ID, **common}
        scheduler.add_job(self._job, self.partition_trigger, **partitions)
        if catch_up:
            scheduler.add_job(
                self._job,
                "date",
                args=[CATCH_UP_JOB_ID],
                id=CATCH_UP_JOB_ID,
                run_date=self.now(),
                **common,
            )
            run_now = {**partitions, "id": f"{PARTITIONS_JOB_ID}.start"}
            scheduler.add_job(self._job, "date", run_date=self.now(), **run_now)

    def stop(self) -> None:
        """Ask running fan-outs to give their claims back and stop."""
        self.stopping.set()

    def _job(self, job_id: str, fire_time: datetime | None = None) -> None:
        runs: dict[str, Callable[[], object]] = {
            DAILY_JOB_ID: lambda: self.run_daily(fire_time),
            MONTHLY_JOB_ID: lambda: self.run_monthly(fire_time),
            SYNC_JOB_ID: lambda: self.run_sync_sweep(fire_time),
            FINALIZE_JOB_ID: lambda: self.run_finalize_sweep(fire_time),
            CATCH_UP_JOB_ID: self.catch_up,
            PARTITIONS_JOB_ID: self.run_partitions,
        }
        triggers = {
            DAILY_JOB_ID: self.daily_trigger,
            MONTHLY_JOB_ID: self.monthly_trigger,
            SYNC_JOB_ID: self.sync_trigger,
            FINALIZE_JOB_ID: self.finalize_trigger,
        }
        if fire_time is None and job_id in triggers:
            fire_time = self._last_fire(triggers[job_id])
        try:
            runs[job_id]()
        except FireInterrupted:
            logger.warning("%s interrupted by shutdown; the next start runs it again", job_id)
        except FireBusy as busy:
            logger.info("%s: %s; looking again in %s", job_id, busy, RETRY_DELAY)
            self._retry_later(job_id, fire_time)
        except Exception:
            logger.exception("%s failed; retrying in %s", job_id, RETRY_DELAY)
            self._retry_later(job_id, fire_time)

    def _retry_later(self, job_id: str, fire_time: datetime | None) -> None:
        if self._apscheduler is None or self.stopping.is_set():
            return
        self._apscheduler.add_job(
            self._job,
            "date",
            args=[job_id, fire_time],
            id=f"{job_id}.retry",
            run_date=self.now() + RETRY_DELAY,
            replace_existing=True,
            misfire_grace_time=None,
        )

    # --- helpers ----------------------------------------------------------------------------

    def _fire(
        self,
        job_id: str,
        key: str,
        fan_out: Callable[[], int],
        *,
        ttl: timedelta | None = None,
    ) -> FireReport:
        started = time.monotonic()
        ttl = ttl or self.settings.fire_lock_ttl
        lease = self.settings.fire_lease
        try:
            claimed = self._retrying(lambda: self.lock.claim(key, lease))
        except BaseException:
            record_fire(job_id, "failed")
            raise
        if not claimed and not self._wait_for_holder(key, lease):
            logger.info("%s: %s already claimed by another scheduler run; skipped", job_id, key)
            record_fire(job_id, "skipped")
            return FireReport(job_id, key, claimed=False)
        self._lease.key, self._lease.renew_at = key, self.monotonic() + lease.total_seconds() / 3
        try:
            sent = fan_out()
            self._retrying(lambda: self.lock.finish(key, ttl))
        except BaseException as error:
            self._release_quietly(key)
            record_fire(job_id, "interrupted" if isinstance(error, FireInterrupted) else "failed")
            raise
        finally:
            self._lease.key = None
        elapsed = time.monotonic() - started
        logger.info(
            "%s: %s enqueued %d messages in %.1f s",
            job_id,
            key,
            sent,
            elapsed,
            extra={"fire": job_id, "key": key, "enqueued": sent, "duration_ms": elapsed * 1000},
        )
        record_fire(job_id, "enqueued")
        return FireReport(job_id, key, claimed=True, enqueued=sent, seconds=elapsed)

    def _last_fire(self, trigger: CronTrigger) -> datetime:
        now = self.now()
        return last_fire_time(trigger, now) or now

    def _wait_for_holder(self, key: str, lease: timedelta) -> bool:
        """Someone holds `key`: wait until they finish it (False) or their lease ends (True, and
        we hold it now). A holder that died stops renewing, so this takes at most a lease.

        Raises:
            FireBusy: still held after two leases (a holder renewing but slow): look again later.
        """
        deadline = self.monotonic() + 2 * lease.total_seconds()
        while not self._retrying(lambda: self.lock.is_done(key)):
            if self._retrying(lambda: self.lock.claim(key, lease)):
                return True
            if self.monotonic() > deadline:
                raise FireBusy(f"{key} is being enqueued by another scheduler run")
            self._check_stopping()
            self.sleep(min(0.5, lease.total_seconds() / 4))
        return False

    def _check_stopping(self) -> None:
        """Called between sends: stop if asked, and keep this thread's fire lease alive.

        Raises:
            FireInterrupted: the scheduler is stopping.
            FireBusy: the lease ran out (a stall) and another run claimed or finished the fire.
        """
        if self.stopping.is_set():
            raise FireInterrupted("scheduler stopping")
        key = getattr(self._lease, "key", None)
        if key is not None and self.monotonic() >= self._lease.renew_at:
            lease = self.settings.fire_lease
            if not (self.lock.renew(key, lease) or self.lock.claim(key, lease)):
                raise FireBusy(f"{key}: the lease ran out and another scheduler run took it")
            self._lease.renew_at = self.monotonic() + lease.total_seconds() / 3

    def _retrying(self, operation: Callable[[], T]) -> T:
        """Run `operation`, retrying broker outages with backoff for `ENQUEUE_RETRY_FOR`."""
        deadline = self.monotonic() + self.settings.enqueue_retry_for.total_seconds()
        delay = 0.2
        warned_at: float | None = None  # the first failure warns, whatever the clock reads
        while True:
            try:
                return operation()
            except TRANSIENT_SEND_ERRORS as error:
                if self.monotonic() >= deadline:
                    raise
                if warned_at is None or self.monotonic() - warned_at > 10:
                    logger.warning("broker unreachable (%s); retrying until it is back", error)
                    warned_at = self.monotonic()
                self._check_stopping()
                self.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _release_quietly(self, key: str) -> None:
        try:
            self.lock.release(key)
        except TRANSIENT_SEND_ERRORS:
            logger.warning("could not release %s; it is claimed until it expires", key)


def make_lock(settings: WorkerSettings) -> FireLock:
    """A Redis fire lock when a Redis URL is configured, else an in-process one."""
    if settings.lock_redis_url:
        client = redis.Redis.from_url(
            settings.lock_redis_url, socket_timeout=10, socket_connect_timeout=10
        )
        return RedisFireLock(client, namespace=settings.namespace)
    logger.warning("no REDIS_URL: fire locks are in-process; run one scheduler only")
    return LocalFireLock()


def deployed_schedule(
    settings: WorkerSettings, database: BillingSettings, session_factory: sessionmaker[Session]
) -> tuple[BillingScheduler, StoppableScheduler]:
    """The deployment's schedule (`python -m workers.scheduler`, `billing run`): its fire lock
    (`make_lock`), the invoice grace period and late-usage lookback of `database`, its jobs
    added to an APScheduler in UTC that the caller starts."""
    billing_scheduler = BillingScheduler(
        settings,
        session_factory,
        make_lock(settings),
        grace_period=database.invoice_grace_period,
        late_usage_lookback=database.invoice_policy().late_fanout_lookback,
    )
    apscheduler = StoppableScheduler(timezone=UTC)
    billing_scheduler.schedule(apscheduler)
    return billing_scheduler, apscheduler


def serve_metrics(settings: WorkerSettings) -> bool:
    """Serve `/metrics` on `SCHEDULER_METRICS_PORT` (in a thread) unless it is 0; True if so."""
    from billing.metrics import serve

    if not settings.scheduler_metrics_port:
        return False
    serve(settings.scheduler_metrics_port, addr=settings.scheduler_metrics_host)
    logger.info(
        "metrics on http://%s:%d/metrics",
        settings.scheduler_metrics_host,
        settings.scheduler_metrics_port,
    )
    return True


def main(argv: list[str] | None = None) -> int:  # pragma: no mutate block (process only)
    """`python -m workers.scheduler`: run the schedule until SIGTERM or SIGINT."""
    from billing.db import make_engine, make_session_factory
    from billing.settings import BillingSettings
    from workers.logs import configure_logging

    settings = WorkerSettings()
    configure_logging(settings)
    serve_metrics(settings)
    database = BillingSettings()
    session_factory = make_session_factory(make_engine(database.database_url))
    billing_scheduler, apscheduler = deployed_schedule(settings, database, session_factory)
    stopping = stop_on_signals(billing_scheduler.stop)
    apscheduler.start()
    logger.info(
        "scheduler started: aggregate %r, invoices %r, invoice sync sweep %s, "
        "draft finalize sweep %s (UTC)",
        settings.aggregate_cron,
        settings.invoice_cron,
        repr(settings.sync_sweep_cron) if billing_scheduler.syncs_invoices else "off",
        repr(settings.finalize_sweep_cron) if billing_scheduler.finalizes_drafts else "off",
    )
    wait_for_stop(stopping)
    apscheduler.shutdown(wait=True)  # running fires see `stopping`, give their claims back
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
