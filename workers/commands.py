"""The workers' `billing` commands: `run`, `aggregate`, `invoice`, `jobs`, `status` and `demo`.

`aggregate` and `invoice` are backfills: they walk the same streamed queries as the scheduler
and either send the messages to the configured broker, or, with `--inline` (and always when no
broker is configured, since an in-process queue would vanish with this command), run the jobs
right here, invoices' provider sync (`PROVIDER_SYNC`) included. Both show a progress bar on
stderr when it is a terminal and end with a summary. With the broker down they give up after
`INTERACTIVE_RETRY_FOR` (a person is waiting) unless `--wait` keeps the scheduler's
`ENQUEUE_RETRY_FOR`.

`jobs requeue` and `jobs purge` act on dead letters (`workers.deadletters`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from billing.db import make_engine, make_session_factory
from billing.localtime import local_month, midnight
from billing.settings import BillingSettings
from webhooks.output import Counted, progress
from webhooks.safetext import safe_text
from workers import fanout
from workers.jobs import aggregate_daily_job, generate_monthly_invoice_job, sync_invoice_job
from workers.locks import LocalFireLock
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from workers.scheduler import BillingScheduler

INTERACTIVE_RETRY_FOR = timedelta(seconds=5)
"""How long a backfill run by a person retries a broker that is down (`--wait`: as the
scheduler does, `ENQUEUE_RETRY_FOR`)."""

WAIT_HELP = "with the broker down, retry for ENQUEUE_RETRY_FOR (scripts) instead of 5 s"


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the workers' commands to the `billing` command line."""
    run = commands.add_parser("run", help="the whole system in one process (embedded default)")
    run.add_argument(
        "--threads", type=int, help="worker threads (default: WORKER_THREADS; 1 on SQLite)"
    )
    run.add_argument("--web-host", default="127.0.0.1", help="web API address (127.0.0.1)")
    run.add_argument("--web-port", type=int, default=8000, help="web API port (8000; 0: any free)")
    run.add_argument("--no-web", action="store_true", help="do not serve the web API")
    run.add_argument("--no-relay", action="store_true", help="do not deliver webhooks")
    run.set_defaults(handler=_run, database="create")

    aggregate = commands.add_parser("aggregate", help="aggregate days of usage (backfill)")
    aggregate.add_argument(
        "--from",
        dest="first",
        type=_day,
        required=True,
        metavar="DAY",
        help="first day (each tenant's local day of that date)",
    )
    aggregate.add_argument(
        "--to",
        dest="last",
        type=_day,
        required=True,
        metavar="DAY",
        help="last day, included (--from 2025-01-01 --to 2025-01-31 is all of January)",
    )
    aggregate.add_argument("--tenant", help="only this tenant")
    aggregate.add_argument("--metric", help="only this metric")
    aggregate.add_argument("--inline", action="store_true", help="run here, not on the workers")
    aggregate.add_argument("--wait", action="store_true", help=WAIT_HELP)
    aggregate.set_defaults(handler=_aggregate)

    invoice = commands.add_parser("invoice", help="invoice a month (backfill)")
    invoice.add_argument("--period", type=_month, required=True, metavar="YYYY-MM")
    invoice.add_argument("--tenant", help="only this tenant")
    invoice.add_argument("--inline", action="store_true", help="run here, not on the workers")
    invoice.add_argument("--wait", action="store_true", help=WAIT_HELP)
    invoice.set_defaults(handler=_invoice)

    jobs = commands.add_parser(
        "jobs", help="queue depths and dead letters; requeue or purge dead letters"
    )
    jobs.add_argument("--recent", type=int, default=10, help="dead letters to list (default 10)")
    jobs.add_argument("--json", action="store_true", help="one JSON object, for machines")
    jobs.set_defaults(handler=_jobs, database=None)
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    for name, text in (
        ("requeue", "send dead letters to the queue again (retries reset)"),
        ("purge", "delete dead letters"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("message_ids", nargs="*", metavar="ID", help="as `billing jobs` lists")
        action.add_argument("--all", action="store_true", help="every dead letter")
        action.set_defaults(handler=_dead_letters, database=None, parser=action)

    status = commands.add_parser(
        "status", help="one-screen health summary; exit 1 when something needs a human"
    )
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    status.set_defaults(handler=_status)

    demo = commands.add_parser("demo", help="a month of billing in a few seconds, no server")
    demo.set_defaults(handler=_demo, database=None)


# --- argument types -----------------------------------------------------------------------


def _day(text: str) -> datetime:
    try:
        return datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None


def _month(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a month (YYYY-MM)") from None


# --- handlers -----------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from billing.api.settings import ApiSettings
    from webhooks.settings import WebhookSettings
    from workers.embedded import Companions, embedded_relay_settings, run_embedded

    companions = Companions(
        relay=None if args.no_relay else embedded_relay_settings(WebhookSettings()),
        web=None if args.no_web else ApiSettings(),
        web_host=args.web_host,
        web_port=args.web_port,
    )
    return run_embedded(
        WorkerSettings(), BillingSettings(), threads=args.threads, companions=companions
    )


def _demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    return run_demo(out=sys.stdout, database_url=BillingSettings().database_url)


def _jobs(args: argparse.Namespace) -> int:
    from workers import actors
    from workers.broker import is_in_process
    from workers.queues import print_stats, queue_stats

    if is_in_process(actors.broker):
        print(
            "no BROKER_URL or REDIS_URL: the queue is in-process and lives inside `billing run`; "
            "set REDIS_URL to inspect the workers' queue"
        )
        return 0
    print_stats(queue_stats(actors.broker, recent=args.recent), as_json=args.json)
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    from workers import actors, deadletters

    if bool(args.message_ids) == args.all:
        args.parser.error("give an ID or --all (not both)")
    act = deadletters.requeue if args.jobs_command == "requeue" else deadletters.purge
    done = act(actors.broker, None if args.all else args.message_ids)
    verb = "requeued" if args.jobs_command == "requeue" else "purged"
    if args.all:
        print(f"{verb} {len(done)} dead letters")
    for message_id in [] if args.all else done:
        print(f"{verb} {safe_text(message_id)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    """Exit 0 when healthy, 1 when something needs a human, 2 when the status is unreadable."""
    from workers import actors
    from workers.status import collect_status
    from workers.status_view import format_status, status_json

    settings = WorkerSettings()
    database = BillingSettings()
    engine = make_engine(database.database_url)
    queues = sorted({actor.queue_name for actor in actors.ACTORS})
    try:  # an unreadable database or Redis: `main` says so in one line, exit 2
        report = collect_status(
            make_session_factory(engine), settings, actors.broker, queues=queues
        )
    finally:
        engine.dispose()
    print(status_json(report) if args.json else format_status(report))
    return 0 if report.healthy else 1


def _aggregate(args: argparse.Namespace) -> int:
    if args.last < args.first:
        print("--to must not be before --from", file=sys.stderr)
        return 2
    dates = [args.first + timedelta(days=n) for n in range((args.last - args.first).days + 1)]
    only = fanout.Filter(tenant_id=args.tenant, metric=args.metric)
    with _Backfill(args.inline, wait=args.wait) as backfill:
        # Each zone's tenants get their own local days of those dates.
        plan = [
            (zoned, [midnight(zoned.tz, day.date()) for day in dates])
            for zoned in _per_zone(backfill.session_factory, only)
        ]
        total = sum(
            fanout.count_usage_pairs(backfill.session_factory, day, only=zoned)
            for zoned, days in plan
            for day in days
        )
        span = f"{dates[0].date()}..{dates[-1].date()}"
        with progress(total, f"aggregate {span}") as bar:
            tally = Tally(bar)
            scheduler = backfill.scheduler(
                send_aggregate=tally.wrap(backfill.aggregate_sender()), send_invoice=_unused
            )
            for zoned, days in plan:
                scheduler.fan_out_days(days, only=zoned)
        return backfill.summary("billing.aggregate_daily", span, tally)


def _invoice(args: argparse.Namespace) -> int:
    from workers.scheduler import month_start

    start = args.period
    end = month_start(start + timedelta(days=32))
    if end > datetime.now(UTC):
        print(
            f"billing invoice: {start:%Y-%m} has not ended yet (it ends {end:%Y-%m-%d %H:%M} UTC)",
            file=sys.stderr,
        )
        return 2
    only = fanout.Filter(tenant_id=args.tenant)
    with _Backfill(args.inline, wait=args.wait) as backfill:
        # Each zone's tenants get their own local month; one not ended yet is left out.
        plan = [
            (zoned, local_month(zoned.tz, midnight(zoned.tz, start.date())))
            for zoned in _per_zone(backfill.session_factory, only)
        ]
        plan = [(zoned, month) for zoned, month in plan if month.end <= datetime.now(UTC)]
        late_since = backfill.late_since()
        total = sum(
            fanout.count_invoice_targets(
                backfill.session_factory, *month, only=zoned, late_since=late_since
            )
            for zoned, month in plan
        )
        span = start.strftime("%Y-%m")
        with progress(total, f"invoice {span}") as bar:
            tally = Tally(bar)
            scheduler = backfill.scheduler(
                send_aggregate=_unused, send_invoice=tally.wrap(backfill.invoice_sender())
            )
            for zoned, month in plan:
                scheduler.fan_out_invoices(*month, only=zoned)
        return backfill.summary("billing.generate_monthly_invoice", span, tally)


def _per_zone(session_factory: sessionmaker[Session], only: fanout.Filter) -> list[fanout.Filter]:
    """`only`, once for each zone the tenants it names are billed in."""
    return [replace(only, zone=zone) for zone in fanout.zone_names(session_factory, only)]


def _unused(**_kwargs: Any) -> None:
    raise AssertionError("this backfill sends one kind of job only")


def backfill_settings(settings: WorkerSettings, *, wait: bool) -> WorkerSettings:
    """`settings` for a backfill: a broker outage is retried for `INTERACTIVE_RETRY_FOR` unless
    `wait` keeps `ENQUEUE_RETRY_FOR`."""
    if wait:
        return settings
    patience = min(settings.enqueue_retry_for, INTERACTIVE_RETRY_FOR)
    return settings.model_copy(update={"enqueue_retry_for": patience})


class _Backfill:
    """Where a backfill's jobs go: to the broker, or run in this process."""

    def __init__(self, inline: bool, *, wait: bool) -> None:
        from workers import actors
        from workers.broker import is_in_process

        self.settings = backfill_settings(WorkerSettings(), wait=wait)
        database = BillingSettings()
        self.policy = database.invoice_policy()
        self.engine = make_engine(database.database_url)
        self.session_factory: sessionmaker[Session] = make_session_factory(self.engine)
        self.inline = inline or is_in_process(actors.broker)
        self._said_where = inline

    def __enter__(self) -> _Backfill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.dispose()

    def scheduler(
        self, *, send_aggregate: Callable[..., object], send_invoice: Callable[..., object]
    ) -> BillingScheduler:
        from workers.scheduler import BillingScheduler

        return BillingScheduler(
            self.settings,
            self.session_factory,
            LocalFireLock(),
            send_aggregate=send_aggregate,
            send_invoice=send_invoice,
            late_usage_lookback=self.policy.late_fanout_lookback,
        )

    def late_since(self) -> datetime | None:
        """What the backfill's scheduler bills late usage since (see `BillingScheduler`)."""
        lookback = self.policy.late_fanout_lookback
        return None if lookback is None else datetime.now(UTC) - lookback

    def _say_where(self) -> None:
        """Once the database answered: say that the jobs run here for want of a broker."""
        if self.inline and not self._said_where:
            print("no broker configured: running the jobs in this process", file=sys.stderr)
            self._said_where = True

    def aggregate_sender(self) -> Callable[..., object]:
        self._say_where()
        if not self.inline:
            from workers.actors import enqueue_aggregate_daily

            return enqueue_aggregate_daily
        return lambda **kw: aggregate_daily_job(self.session_factory, _payload(kw))

    def invoice_sender(self) -> Callable[..., object]:
        self._say_where()
        if not self.inline:
            from workers.actors import enqueue_generate_monthly_invoice

            return enqueue_generate_monthly_invoice
        sync = self._sync_here()
        return lambda **kw: generate_monthly_invoice_job(
            self.session_factory, _payload(kw), enqueue_sync=sync, policy=self.policy
        )

    def _sync_here(self) -> Callable[[str], object] | None:
        """With `PROVIDER_SYNC`, what sends an invoice made here to the provider, right here."""
        if not self.settings.provider_sync:
            return None
        from workers.provider import load_provider_sync

        hook = load_provider_sync(self.settings.provider_sync)
        factory = self.session_factory
        return lambda invoice_id: sync_invoice_job(
            factory, {"invoice_id": invoice_id}, provider_sync=hook
        )

    def summary(self, job: str, span: str, tally: Tally) -> int:
        verb = "ran" if self.inline else "enqueued"
        print(f"{job} {span}: {verb} {tally.done}, failed {tally.failed}, in {tally.elapsed:.1f} s")
        for line in tally.errors[:10]:
            print(f"  {safe_text(line)}")  # tenant ids, metrics and messages are untrusted
        return 1 if tally.failed else 0


def _payload(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in kwargs.items()}


class Tally:
    """A backfill's counts: sends done and failed, and the failures' messages.

    `wrap(send)` counts each call and advances the progress `bar`; an exception from an inline
    job is counted as a failure and the backfill goes on (the broker's outages are retried by
    the scheduler code first, then stop the backfill).
    """

    def __init__(self, bar: Counted) -> None:
        self.bar = bar
        self.done = self.failed = 0
        self.errors: list[str] = []
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def wrap(self, send: Callable[..., object]) -> Callable[..., object]:
        def counted(**kwargs: Any) -> None:
            try:
                send(**kwargs)
            except Exception as error:
                if not self._is_job_error(error):
                    raise
                self.failed += 1
                self.errors.append(f"{kwargs.get('tenant_id')}: {type(error).__name__}: {error}")
            self.done += 1
            self.bar.advance(self.failed)

        return counted

    @staticmethod
    def _is_job_error(error: Exception) -> bool:
        from workers.scheduler import TRANSIENT_SEND_ERRORS

        return not isinstance(error, TRANSIENT_SEND_ERRORS)
