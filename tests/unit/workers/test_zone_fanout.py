"""The hourly fan-outs per time zone, end to end: each tenant's local day is enqueued once it
has ended in its zone, and the jobs aggregate exactly its events (New York's 23- and 25-hour
days of March and November 2025, Kathmandu's +05:45), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing.models import Invoice, UsageAggregate
from billing.tenants import set_tenant
from workers import actors, fanout
from workers.broker import QUEUE_NAME
from workers.cli import main
from workers.jobs import USAGE_AGGREGATED, aggregate_daily_job, generate_monthly_invoice_job
from workers.locks import LocalFireLock
from workers.scheduler import BillingScheduler
from workers.settings import WorkerSettings

from .conftest import add_plan, subscribe

SECOND = timedelta(seconds=1)
NO_WINDOW = WorkerSettings(late_event_window_days=0)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def hours(first: datetime, last: datetime) -> list[datetime]:
    """Every hourly fire time from `first` to `last`."""
    count = int((last - first) / timedelta(hours=1)) + 1
    return [first + timedelta(hours=n) for n in range(count)]


class InlineJobs:
    """Stands in for the enqueue helpers: records each send and runs the job at once, with
    the payload the actor would get."""

    def __init__(self, session_factory) -> None:
        self.session_factory = session_factory
        self.days: list[tuple[str, str]] = []
        self.invoices: list[tuple[str, str, str]] = []

    def aggregate(self, *, tenant_id: str, metric: str, day_start: datetime) -> None:
        self.days.append((tenant_id, day_start.isoformat()))
        payload = {"tenant_id": tenant_id, "metric": metric, "day_start": day_start.isoformat()}
        aggregate_daily_job(self.session_factory, payload)

    def invoice(self, **kwargs) -> None:
        payload = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in kwargs.items()}
        self.invoices.append((payload["tenant_id"], payload["period_start"], payload["period_end"]))
        generate_monthly_invoice_job(self.session_factory, payload)


@pytest.fixture
def zoned(session_factory, seeded):
    """Tenants `ny` (New York) and `ktm` (Kathmandu); `utc` has no row."""
    with session_factory.begin() as session:
        set_tenant(session, "ny", timezone="America/New_York")
        set_tenant(session, "ktm", timezone="Asia/Kathmandu")
    return seeded


def scheduler_for(session_factory, jobs: InlineJobs, *, lock=None, settings=NO_WINDOW):
    return BillingScheduler(
        settings,
        session_factory,
        lock or LocalFireLock(),
        send_aggregate=jobs.aggregate,
        send_invoice=jobs.invoice,
        sleep=lambda _s: None,
    )


def totals(session_factory, tenant: str) -> dict[datetime, int]:
    with session_factory() as session:
        rows = session.scalars(
            select(UsageAggregate).where(
                UsageAggregate.tenant_id == tenant, UsageAggregate.group_key == ""
            )
        )
        return {row.period_start: row.total for row in rows}


def test_march_days_are_enqueued_by_the_first_fire_after_they_end_there(
    session_factory, zoned
) -> None:
    zoned(
        [
            ("ny", 1, at(2025, 3, 9, 5) - SECOND),  # Saturday 8th, 23:59:59 EST
            ("ny", 10, at(2025, 3, 9, 5)),  # Sunday 9th, 00:00 EST
            ("ny", 100, at(2025, 3, 10, 4) - SECOND),  # Sunday 9th, 23:59:59 EDT
            ("ny", 1000, at(2025, 3, 10, 4)),  # Monday 10th, 00:00 EDT
            ("ktm", 20, at(2025, 3, 10, 18, 15) - SECOND),  # 10th, 23:59:59 in Kathmandu
            ("ktm", 30, at(2025, 3, 10, 18, 15)),  # 11th, 00:00
            ("utc", 7, at(2025, 3, 9, 23, 59)),
        ]
    )
    jobs = InlineJobs(session_factory)
    scheduler = scheduler_for(session_factory, jobs)
    sent_at: dict[tuple[str, str], datetime] = {}
    for fire in hours(at(2025, 3, 10, 0, 10), at(2025, 3, 10, 23, 10)):
        before = len(jobs.days)
        scheduler.run_daily(fire)
        for sent in jobs.days[before:]:
            sent_at[sent] = fire
    assert sent_at == {
        ("utc", "2025-03-09T00:00:00+00:00"): at(2025, 3, 10, 0, 10),
        # New York's 8th (catch-up at the first fire), then its 23-hour 9th once it ended.
        ("ny", "2025-03-08T00:00:00-05:00"): at(2025, 3, 10, 0, 10),
        ("ny", "2025-03-09T00:00:00-05:00"): at(2025, 3, 10, 4, 10),
        ("ktm", "2025-03-10T00:00:00+05:45"): at(2025, 3, 10, 19, 10),
    }
    assert len(jobs.days) == len(sent_at)  # each (tenant, day) once
    assert totals(session_factory, "ny") == {at(2025, 3, 8, 5): 1, at(2025, 3, 9, 5): 110}
    assert totals(session_factory, "ktm") == {at(2025, 3, 9, 18, 15): 20}
    assert totals(session_factory, "utc") == {at(2025, 3, 9): 7}


def test_the_25_hour_november_day_aggregates_exactly_its_events(session_factory, zoned) -> None:
    zoned(
        [
            ("ny", 1, at(2025, 11, 2, 4) - SECOND),  # Saturday 1st, 23:59:59 EDT
            ("ny", 10, at(2025, 11, 2, 4)),  # Sunday 2nd, 00:00 EDT
            ("ny", 50, at(2025, 11, 2, 6)),  # 01:00 EST, the second time the clock shows it
            ("ny", 100, at(2025, 11, 3, 5) - SECOND),  # Sunday 2nd, 23:59:59 EST
            ("ny", 1000, at(2025, 11, 3, 5)),  # Monday 3rd
        ]
    )
    jobs = InlineJobs(session_factory)
    scheduler = scheduler_for(session_factory, jobs)
    scheduler.run_daily(at(2025, 11, 3, 4, 10))  # the 2nd has not ended in New York yet
    assert ("ny", "2025-11-02T00:00:00-04:00") not in jobs.days
    report = scheduler.run_daily(at(2025, 11, 3, 5, 10))
    [ny_fire] = [z for z in report.zones if z.key.startswith("aggregate-daily:America/New_York")]
    assert (ny_fire.key, ny_fire.claimed) == ("aggregate-daily:America/New_York:2025-11-02", True)
    assert totals(session_factory, "ny")[at(2025, 11, 2, 4)] == 160
    with session_factory() as session:
        assert at(2025, 11, 3, 5) not in totals(session_factory, "ny")
        assert session.scalar(select(UsageAggregate.id).where(UsageAggregate.total == 1000)) is None


def test_two_schedulers_enqueue_each_zone_day_once(session_factory, zoned) -> None:
    zoned(
        [("ny", 10, at(2025, 3, 9, 5)), ("ktm", 20, at(2025, 3, 9, 12)), ("utc", 7, at(2025, 3, 9))]
    )
    lock = LocalFireLock()
    jobs = InlineJobs(session_factory)
    first, second = (
        scheduler_for(session_factory, jobs, lock=lock, settings=WorkerSettings()) for _ in range(2)
    )
    for fire in hours(at(2025, 3, 10, 0, 10), at(2025, 3, 10, 6, 10)):
        first.run_daily(fire)
        second.run_daily(fire + SECOND)  # a clock a second apart: the same fire
    assert sorted(jobs.days) == sorted(set(jobs.days))
    assert ("ny", "2025-03-09T00:00:00-05:00") in jobs.days


def test_each_zones_month_is_invoiced_once_after_it_ends_there(session_factory, zoned) -> None:
    with session_factory.begin() as session:
        plan = add_plan(session)
        for tenant in ("ny", "ktm", "utc"):
            subscribe(session, tenant, plan, start=at(2024, 12, 1))
    jobs = InlineJobs(session_factory)
    scheduler = scheduler_for(session_factory, jobs)
    sent_at = {}
    for fire in hours(at(2025, 4, 1, 0, 30), at(2025, 4, 2, 23, 30)):
        before = len(jobs.invoices)
        report = scheduler.run_monthly(fire)
        assert report.key.startswith("monthly-invoices:")
        for sent in jobs.invoices[before:]:
            sent_at[sent] = fire
    assert sent_at == {
        ("utc", "2025-03-01T00:00:00+00:00", "2025-04-01T00:00:00+00:00"): at(2025, 4, 1, 0, 30),
        ("ktm", "2025-03-01T00:00:00+05:45", "2025-04-01T00:00:00+05:45"): at(2025, 4, 1, 0, 30),
        # New York's February at the first fire (catch-up), its March once it ended at 04:00.
        ("ny", "2025-02-01T00:00:00-05:00", "2025-03-01T00:00:00-05:00"): at(2025, 4, 1, 0, 30),
        ("ny", "2025-03-01T00:00:00-05:00", "2025-04-01T00:00:00-04:00"): at(2025, 4, 1, 4, 30),
    }
    with session_factory() as session:
        periods = {
            (i.tenant_id, i.period_start, i.period_end, i.total_amount)
            for i in session.scalars(select(Invoice))
        }
    # A whole month's fixed fee of 10.00 on each, whatever the month's length in seconds.
    assert (("ny", at(2025, 3, 1, 5), at(2025, 4, 1, 4), 1000)) in periods
    assert (("ktm", at(2025, 2, 28, 18, 15), at(2025, 3, 31, 18, 15), 1000)) in periods


def test_the_catch_up_on_start_enqueues_each_zones_missed_day(session_factory, zoned) -> None:
    zoned([("ny", 10, at(2025, 3, 9, 5)), ("ktm", 20, at(2025, 3, 9, 12))])
    jobs = InlineJobs(session_factory)
    scheduler = BillingScheduler(
        NO_WINDOW,
        session_factory,
        LocalFireLock(),
        send_aggregate=jobs.aggregate,
        send_invoice=jobs.invoice,
        now=lambda: at(2025, 3, 10, 4, 30),  # started after New York's 9th ended
    )
    scheduler.catch_up()
    assert ("ny", "2025-03-09T00:00:00-05:00") in jobs.days
    assert ("ktm", "2025-03-10T00:00:00+05:45") not in jobs.days  # not over in Kathmandu yet
    assert ("ktm", "2025-03-09T00:00:00+05:45") in jobs.days


def test_the_fan_out_sends_real_messages_with_the_local_midnight(
    session_factory, zoned, stub_broker
) -> None:
    zoned([("ny", 10, at(2025, 3, 9, 5))])
    scheduler = BillingScheduler(NO_WINDOW, session_factory, LocalFireLock())
    scheduler.run_daily(at(2025, 3, 10, 4, 10))
    bodies = [m.decode() for m in stub_broker.queues[QUEUE_NAME].queue]
    assert any('"day_start":"2025-03-09T00:00:00-05:00"' in body for body in bodies), bodies
    assert actors.aggregate_daily.actor_name == "billing.aggregate_daily"


def test_the_aggregated_event_shows_the_tenants_offset(session_factory, zoned, outbox) -> None:
    zoned([("ktm", 20, at(2025, 3, 9, 12))])
    jobs = InlineJobs(session_factory)
    scheduler_for(session_factory, jobs).run_daily(at(2025, 3, 9, 18, 30))
    [event] = [e for e in outbox(USAGE_AGGREGATED) if e["tenant_id"] == "ktm"]
    assert (event["day_start"], event["total"]) == ("2025-03-09T00:00:00+05:45", 20)


# --- backfills: each tenant's own local days and month of the dates asked -------------------


@pytest.fixture
def cli_factory(sqlite_engine, monkeypatch):
    from billing.db import make_session_factory

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    factory = make_session_factory(sqlite_engine)
    with factory.begin() as session:
        set_tenant(session, "ny", timezone="America/New_York")
    return factory


def test_billing_aggregate_takes_each_tenants_local_day(cli_factory, seeded_cli, capsys) -> None:
    seeded_cli(
        [("ny", 10, at(2025, 3, 9, 5)), ("ny", 5, at(2025, 3, 9, 1)), ("utc", 7, at(2025, 3, 9))]
    )
    assert main(["aggregate", "--from", "2025-03-09", "--to", "2025-03-09", "--inline"]) == 0
    assert "ran 2, failed 0" in capsys.readouterr().out
    assert totals(cli_factory, "ny") == {at(2025, 3, 9, 5): 10}  # not the 8th's event at 01:00
    assert totals(cli_factory, "utc") == {at(2025, 3, 9): 7}


def test_billing_invoice_takes_each_tenants_local_month(cli_factory, capsys) -> None:
    with cli_factory.begin() as session:
        plan = add_plan(session)
        subscribe(session, "ny", plan, start=at(2024, 12, 1))
        subscribe(session, "utc", plan, start=at(2024, 12, 1))
    assert main(["invoice", "--period", "2025-03", "--inline"]) == 0
    with cli_factory() as session:
        periods = sorted((i.tenant_id, i.period_start) for i in session.scalars(select(Invoice)))
    assert periods == [("ny", at(2025, 3, 1, 5)), ("utc", at(2025, 3, 1))]


@pytest.fixture
def seeded_cli(cli_factory):
    from .conftest import use

    def seed(rows) -> None:
        with cli_factory.begin() as session:
            for tenant, amount, moment in rows:
                use(session, tenant, amount, moment)

    return seed


def test_status_counts_each_zones_local_month_once_it_is_over(
    session_factory, zoned, stub_broker
) -> None:
    from workers.status import collect_status

    with session_factory.begin() as session:
        plan = add_plan(session)
        subscribe(session, "ny", plan, start=at(2024, 12, 1))
        subscribe(session, "utc", plan, start=at(2024, 12, 1))

    def status(now: datetime):
        return collect_status(session_factory, WorkerSettings(), stub_broker, now=lambda: now)

    early = status(at(2025, 2, 1, 4)).invoice_run  # January is not over in New York yet
    assert early is not None
    assert (early.expected, early.missing) == (1, 1)
    report = status(at(2025, 2, 10, 12))
    assert report.invoice_run is not None
    assert (report.invoice_run.expected, report.invoice_run.missing) == (2, 2)
    # Due 6 hours after the first fire that followed the end of the earliest missing month.
    assert report.problems == [
        "2 of 2 invoice(s) for 2025-01 missing since 2025-02-01 06:30 UTC "
        "(see `billing invoice --period`)"
    ]
    jobs = InlineJobs(session_factory)
    scheduler_for(session_factory, jobs).fan_out_invoices(
        at(2025, 1, 1), at(2025, 2, 1), only=fanout.Filter(zone="UTC")
    )
    after = status(at(2025, 2, 1, 11)).invoice_run
    assert after is not None
    # Only New York's is missing: due 6 hours after the fire at 05:30 that followed its end.
    assert (after.expected, after.missing, after.due_at) == (2, 1, at(2025, 2, 1, 11, 30))
    assert status(at(2025, 2, 1, 11)).problems == []
