"""`billing status`: is billing healthy, and if not, what needs a human?

`collect_status` reads the broker's queues and the database once and returns a `StatusReport`;
its `problems` are what makes `billing status` exit 1 (thresholds are `WorkerSettings`'
`STATUS_*` fields):

- a message dead-lettered within `STATUS_DEAD_WINDOW` (the newest few are named: job, tenant
  and why, e.g. `AmountOverflowError: the line of metric 'tokens' at price 'pro-tokens' …`);
- a webhook delivery that died within `STATUS_DEAD_WINDOW`;
- a disabled webhook subscription (by the relay after failing for days, or by an operator);
- a due webhook delivery waiting for the relay longer than `STATUS_MAX_DELIVERY_DELAY`;
- no aggregate for `STATUS_MAX_AGGREGATE_AGE` while a finished day's usage has none;
- last month's invoices still missing `STATUS_INVOICE_GRACE` after the `INVOICE_CRON` fire;
- with `PROVIDER_SYNC`, an invoice without a provider id `STATUS_MAX_UNSYNCED_AGE` after it
  was created (within `SYNC_LOOKBACK`).

Each figure is one cheap query; the usage check only runs when aggregates look stale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from dramatiq import Broker
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import case, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from billing import tenants
from billing.aggregation import utc_day_start
from billing.localtime import Period, midnight
from billing.models import Invoice, UsageAggregate, UsageEvent
from webhooks.metrics import outbox_stats
from webhooks.models import DEAD, WebhookDelivery, WebhookSubscription
from workers import fanout
from workers.broker import QUEUE_NAME, is_in_process
from workers.queues import DeadLetter, queue_stats
from workers.scheduler import last_fire_time, previous_month
from workers.settings import WorkerSettings


@dataclass(frozen=True)
class QueueHealth:
    """One queue's counts; `dead_recent` is the dead letters within `STATUS_DEAD_WINDOW`, and
    `recent_dead_letters` the newest of those (at most `RECENT_DEAD_LETTERS`)."""

    name: str
    ready: int
    in_progress: int | None
    delayed: int
    dead: int
    dead_recent: int
    recent_dead_letters: list[DeadLetter] = field(default_factory=list)


#: How many of a queue's recent dead letters `billing status` names.
RECENT_DEAD_LETTERS = 5


@dataclass(frozen=True)
class DisabledSubscription:
    """A webhook subscription the relay no longer delivers to."""

    id: str
    topic: str
    url: str
    reason: str | None


@dataclass(frozen=True)
class OutboxHealth:
    """Webhook deliveries: what waits, how late the relay is, what died, what is disabled.

    As `webhooks.metrics.outbox_stats` reads them: `backlog` counts the pending and failed
    deliveries of enabled subscriptions; `oldest_pending_age` is how long the most overdue of
    them has waited for a relay since it fell due, None when none is due.
    """

    backlog: int
    oldest_pending_age: timedelta | None
    dead: int
    dead_recent: int
    disabled: list[DisabledSubscription]


@dataclass(frozen=True)
class InvoiceRun:
    """Last month's invoices: how many (tenant, currency) are due, how many are missing."""

    period_start: datetime
    due_at: datetime
    expected: int
    missing: int


@dataclass(frozen=True)
class SyncHealth:
    """Invoices without a provider id (created within `SYNC_LOOKBACK`), and the overdue ones."""

    unsynced: int
    overdue: int


@dataclass(frozen=True)
class StatusReport:
    """Everything `billing status` shows; `healthy` when `problems` is empty."""

    checked_at: datetime
    broker: str
    queues: list[QueueHealth]
    outbox: OutboxHealth
    last_aggregate_at: datetime | None
    last_invoice_at: datetime | None
    invoice_run: InvoiceRun | None
    sync: SyncHealth | None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when nothing needs a human."""
        return not self.problems


def collect_status(
    session_factory: sessionmaker[Session],
    settings: WorkerSettings,
    broker: Broker,
    *,
    queues: Sequence[str] = (QUEUE_NAME,),
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> StatusReport:
    """Read the queues and the database, and judge them against the `STATUS_*` thresholds."""
    checked_at = now()
    since = checked_at - settings.status_dead_window
    broker_name, queue_health = _queues(broker, queues, since)
    with session_factory() as session:
        outbox = _outbox(session, checked_at, since)
        last_aggregate = session.scalar(select(func.max(UsageAggregate.updated_at)))
        last_invoice = session.scalar(select(func.max(Invoice.created_at)))
        stale_usage = _usage_waiting(session, settings, checked_at, last_aggregate)
        invoice_run = _invoice_run(session, settings, checked_at)
        sync = _sync(session, settings, checked_at) if settings.provider_sync else None
    report = StatusReport(
        checked_at=checked_at,
        broker=broker_name,
        queues=queue_health,
        outbox=outbox,
        last_aggregate_at=last_aggregate,
        last_invoice_at=last_invoice,
        invoice_run=invoice_run,
        sync=sync,
    )
    report.problems.extend(_problems(report, settings, stale_usage))
    return report


def _problems(report: StatusReport, settings: WorkerSettings, stale_usage: bool) -> list[str]:
    window = format_span(settings.status_dead_window)
    problems = [
        f"queue {q.name}: {q.dead_recent} message(s) dead-lettered in the last {window} "
        "(see `billing jobs`)"
        for q in report.queues
        if q.dead_recent
    ]
    problems += [
        dead_letter_line(letter) for q in report.queues for letter in q.recent_dead_letters
    ]
    outbox = report.outbox
    if outbox.dead_recent:
        problems.append(
            f"{outbox.dead_recent} webhook delivery(ies) died in the last {window} "
            "(see `billing webhooks deliveries`, then replay)"
        )
    problems.extend(
        f"webhook subscription {sub.id} ({sub.topic}) is disabled: {sub.reason or 'no reason'}"
        for sub in outbox.disabled
    )
    delay = outbox.oldest_pending_age
    if delay is not None and delay > settings.status_max_delivery_delay:
        problems.append(
            f"a webhook delivery has waited {format_span(delay)} for the relay "
            f"(over {format_span(settings.status_max_delivery_delay)}): is the relay running?"
        )
    if stale_usage:
        problems.append(
            f"no usage aggregated for over {format_span(settings.status_max_aggregate_age)} while "
            "finished days have usage: are the scheduler and workers running?"
        )
    run = report.invoice_run
    if run is not None and run.missing and report.checked_at >= run.due_at:
        problems.append(
            f"{run.missing} of {run.expected} invoice(s) for {run.period_start:%Y-%m} missing "
            f"since {run.due_at:%Y-%m-%d %H:%M} UTC (see `billing invoice --period`)"
        )
    if report.sync is not None and report.sync.overdue:
        problems.append(
            f"{report.sync.overdue} invoice(s) not synced to the payment provider "
            f"{format_span(settings.status_max_unsynced_age)} after creation"
        )
    return problems


def dead_letter_line(letter: DeadLetter) -> str:
    """`billing.generate_monthly_invoice for tenant t1 is dead (message …): <why>`.

    The `for …` part names the payload's tenant (or else invoice); it is left out when the
    payload has neither, or only an empty one."""
    payload = letter.args[0] if letter.args and isinstance(letter.args[0], dict) else {}
    return (
        f"{letter.actor_name}{_about(payload)} is dead (message {letter.message_id}): "
        f"{letter.last_error or 'no reason recorded'}"
    )


def _about(payload: dict[str, Any]) -> str:
    for owner in ("tenant", "invoice"):
        named = str(payload.get(f"{owner}_id") or "").strip()
        if named:
            return f" for {owner} {named}"
    return ""


# --- the figures --------------------------------------------------------------------------


def _queues(broker: Broker, names: Sequence[str], since: datetime) -> tuple[str, list[QueueHealth]]:
    if is_in_process(broker):
        return "in-process", []
    health = []
    kind = ""
    for name in names:
        stats = queue_stats(broker, queue_name=name, recent=RECENT_DEAD_LETTERS)
        kind = stats.broker
        recent = stats.dead
        if isinstance(broker, RedisBroker):
            recent = int(
                broker.client.zcount(
                    f"{broker.namespace}:{name}.XQ", int(since.timestamp() * 1000), "+inf"
                )
            )
        letters = [
            letter
            for letter in stats.dead_letters
            if letter.dead_since is None or letter.dead_since >= since
        ]
        health.append(
            QueueHealth(
                name, stats.ready, stats.in_progress, stats.delayed, stats.dead, recent, letters
            )
        )
    return kind, health


def _outbox(session: Session, now: datetime, since: datetime) -> OutboxHealth:
    stats = outbox_stats(session, now)
    dead_recent = session.scalar(
        select(func.count()).where(
            WebhookDelivery.status == DEAD, WebhookDelivery.updated_at >= since
        )
    )
    disabled = [
        DisabledSubscription(sub.id, sub.topic, sub.url, sub.disabled_reason)
        for sub in session.scalars(
            select(WebhookSubscription)
            .where(WebhookSubscription.enabled.is_(False))
            .order_by(WebhookSubscription.created_at, WebhookSubscription.id)
        )
    ]
    return OutboxHealth(
        backlog=stats.backlog,
        oldest_pending_age=stats.oldest_due_age if stats.due else None,
        dead=stats.dead,
        dead_recent=int(dead_recent or 0),
        disabled=disabled,
    )


def _usage_waiting(
    session: Session,
    settings: WorkerSettings,
    now: datetime,
    last_aggregate: datetime | None,
) -> bool:
    """True when aggregates are stale and usage newer than the last one waits in a day that
    ended long enough ago (`STATUS_MAX_AGGREGATE_AGE` minus the day itself) to be aggregated."""
    max_age = settings.status_max_aggregate_age
    if last_aggregate is not None and now - last_aggregate <= max_age:
        return False
    finished_before = utc_day_start(now - max(max_age - timedelta(days=1), timedelta(0)))
    query = select(UsageEvent.id).where(UsageEvent.at_ts < finished_before)
    if last_aggregate is not None:
        query = query.where(UsageEvent.at_ts > last_aggregate)
    return bool(session.scalar(select(exists(query))))


def _invoice_run(session: Session, settings: WorkerSettings, now: datetime) -> InvoiceRun | None:
    """Last month's (tenant, currency) invoice targets and how many have no invoice yet.

    Each zone's tenants are counted against their local month of that name, once it has ended;
    the run is due `STATUS_INVOICE_GRACE` after the first fire that followed the end of the
    earliest month still missing an invoice (of the UTC month when none is missing).
    """
    trigger = CronTrigger.from_crontab(settings.invoice_cron, timezone=UTC)
    fired = last_fire_time(trigger, now)
    if fired is None:
        return None
    start, end = previous_month(fired)
    expected = missing = 0
    dues: list[datetime] = []
    for zone in fanout.zones_in_use(session):
        tz = tenants.zone(zone)
        local = Period(midnight(tz, start.date()), midnight(tz, end.date()))
        if local.end > now:
            continue  # not over there yet
        due: datetime = trigger.get_next_fire_time(None, local.end) or fired
        zone_expected, zone_missing = _invoices_missing(session, zone, local)
        expected, missing = expected + zone_expected, missing + zone_missing
        if zone_missing:
            dues.append(due)
    first_due: datetime = trigger.get_next_fire_time(None, end) or fired
    due_at = min(dues, default=first_due)
    return InvoiceRun(start, due_at + settings.status_invoice_grace, expected, missing)


def _invoices_missing(session: Session, zone: str, period: Period) -> tuple[int, int]:
    """How many (tenant, currency) of `zone` are to be invoiced for `period`, how many are not."""
    targets = fanout.invoice_targets_query(*period, fanout.Filter(zone=zone)).subquery()
    invoiced = exists().where(
        Invoice.tenant_id == targets.c.tenant_id,
        Invoice.currency == targets.c.currency,
        Invoice.period_start == period.start,
        Invoice.period_end == period.end,
    )
    expected, missing = session.execute(
        select(func.count(), func.coalesce(func.sum(case((~invoiced, 1), else_=0)), 0)).select_from(
            targets
        )
    ).one()
    return int(expected), int(missing)


def _sync(session: Session, settings: WorkerSettings, now: datetime) -> SyncHealth:
    overdue_before = now - settings.status_max_unsynced_age
    unsynced, overdue = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Invoice.created_at < overdue_before, 1), else_=0)), 0),
        ).where(
            Invoice.provider_invoice_id.is_(None),
            Invoice.created_at >= now - settings.sync_lookback,
        )
    ).one()
    return SyncHealth(int(unsynced), int(overdue))


def format_span(delta: timedelta) -> str:
    """`36 h`, `15 min`, `3 s`, `2 d`: a duration as people read it."""
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} d"
    if seconds >= 3600:
        return f"{seconds // 3600} h"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"
