"""The scheduler's fan-outs, fire locks, catch-up and schedule (StubBroker, fakeredis)."""

from __future__ import annotations

import logging
import re
import threading
from datetime import UTC, datetime, timedelta

import fakeredis
import pytest
import redis
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import REGISTRY
from sqlalchemy import Connection, insert
from sqlalchemy.orm import sessionmaker

from billing.models import Plan, Price, Subscription, Tenant
from billing.settings import BillingSettings
from billing.tenants import set_tenant
from tests.processes import wait_until
from workers.broker import QUEUE_NAME
from workers.locks import LocalFireLock, RedisFireLock
from workers.scheduler import (
    CATCH_UP_JOB_ID,
    DAILY_JOB_ID,
    DAY,
    FINALIZE_JOB_ID,
    MONTHLY_JOB_ID,
    PARTITIONS_JOB_ID,
    SYNC_JOB_ID,
    BillingScheduler,
    FireBusy,
    FireInterrupted,
    StoppableScheduler,
    deployed_schedule,
    last_fire_time,
    make_lock,
    previous_month,
)
from workers.settings import WorkerSettings

JAN = datetime(2025, 1, 1, tzinfo=UTC)
DEC = datetime(2024, 12, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)


class Recorder:
    """Stands in for the enqueue helpers; can fail the first N calls like a Redis outage."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict] = []
        self.fail_first = fail_first
        self.mutex = threading.Lock()

    def __call__(self, **kwargs) -> None:
        with self.mutex:
            if self.fail_first:
                self.fail_first -= 1
                raise redis.ConnectionError("Connection refused")
            self.calls.append(kwargs)


def make_scheduler(session_factory, lock=None, settings=None, **kwargs) -> BillingScheduler:
    kwargs.setdefault("send_aggregate", Recorder())
    kwargs.setdefault("send_invoice", Recorder())
    kwargs.setdefault("sleep", lambda _s: None)
    lock = lock or LocalFireLock()
    return BillingScheduler(settings or WorkerSettings(), session_factory, lock, **kwargs)


def pairs(recorder: Recorder) -> list[tuple]:
    return sorted((c["tenant_id"], c["metric"], c["day_start"]) for c in recorder.calls)


def test_last_fire_time_and_periods() -> None:
    scheduler_settings = WorkerSettings()
    from apscheduler.triggers.cron import CronTrigger

    daily = CronTrigger.from_crontab(scheduler_settings.aggregate_cron, timezone=UTC)
    monthly = CronTrigger.from_crontab(scheduler_settings.invoice_cron, timezone=UTC)
    now = datetime(2025, 3, 15, 0, 5, tzinfo=UTC)
    # Hourly, and every hour of the 1st and 2nd: each zone's day and month soon after it ends.
    assert last_fire_time(daily, now) == datetime(2025, 3, 14, 23, 10, tzinfo=UTC)
    assert last_fire_time(daily, now + timedelta(minutes=5)) == now + timedelta(minutes=5)
    assert last_fire_time(monthly, now) == datetime(2025, 3, 2, 23, 30, tzinfo=UTC)
    assert monthly.get_next_fire_time(None, FEB) == datetime(2025, 2, 1, 0, 30, tzinfo=UTC)
    assert previous_month(datetime(2025, 3, 1, 0, 30, tzinfo=UTC)) == (
        FEB,
        datetime(2025, 3, 1, tzinfo=UTC),
    )
    assert previous_month(datetime(2025, 1, 1, 0, 30, tzinfo=UTC)) == (DEC, JAN)


def test_the_daily_fire_enqueues_yesterday_and_the_late_window_once_per_pair(
    session_factory, seeded
) -> None:
    fire = datetime(2025, 1, 4, 0, 10, tzinfo=UTC)
    seeded(
        [
            ("t1", 1, datetime(2025, 1, 3, 5, tzinfo=UTC)),
            ("t1", 2, datetime(2025, 1, 3, 6, tzinfo=UTC)),  # same pair, same day: once
            ("t2", 3, datetime(2025, 1, 3, 23, 59, tzinfo=UTC)),
            ("t3", 4, datetime(2025, 1, 2, 12, tzinfo=UTC)),  # inside the late-event window
            ("t4", 5, datetime(2025, 1, 1, 12, tzinfo=UTC)),  # outside it
            ("t5", 6, datetime(2025, 1, 4, 0, 1, tzinfo=UTC)),  # today: not yet
        ]
    )
    scheduler = make_scheduler(session_factory)
    report = scheduler.run_daily(fire)
    assert (report.claimed, report.enqueued, report.key) == (True, 3, "aggregate-daily:2025-01-03")
    jan3, jan2 = datetime(2025, 1, 3, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC)
    assert pairs(scheduler.send_aggregate) == [
        ("t1", "tokens", jan3),
        ("t2", "tokens", jan3),
        ("t3", "tokens", jan2),
    ]
    again = scheduler.run_daily(fire)
    assert (again.claimed, again.enqueued) == (False, 0)
    assert len(scheduler.send_aggregate.calls) == 3


def test_a_wider_late_event_window_goes_further_back(session_factory, seeded) -> None:
    seeded([("t4", 5, datetime(2025, 1, 1, 12, tzinfo=UTC))])
    scheduler = make_scheduler(session_factory, settings=WorkerSettings(late_event_window_days=2))
    assert scheduler.run_daily(datetime(2025, 1, 4, 0, 10, tzinfo=UTC)).enqueued == 1


def test_the_monthly_fire_enqueues_each_active_tenant_once_per_currency(session_factory) -> None:
    with session_factory.begin() as session:
        multi = Plan(key="multi", name="Multi")
        usd_only = Plan(key="usd", name="USD")
        free = Plan(key="free", name="Free")  # no prices: nothing to invoice
        session.add_all([multi, usd_only, free])
        session.flush()
        for plan, currencies in ((multi, ("usd", "eur")), (usd_only, ("usd",))):
            for currency in currencies:
                for kind in ("fee", "tokens"):
                    session.add(
                        Price(
                            plan_id=plan.id,
                            key=f"{plan.key}-{kind}-{currency}",
                            currency=currency,
                            unit_amount=100,
                            metric=None if kind == "fee" else "tokens",
                        )
                    )

        def sub(tenant, plan, start, end=None):
            session.add(
                Subscription(tenant_id=tenant, plan_id=plan.id, effective_at=start, ended_at=end)
            )

        sub("a", multi, DEC - timedelta(days=30))
        sub("b", usd_only, JAN + timedelta(days=20))  # started during January
        sub("c", usd_only, DEC, end=JAN + timedelta(days=1))  # ended during January
        sub("d", usd_only, DEC, end=JAN)  # ended before January
        sub("e", usd_only, FEB)  # starts after January
        sub("f", free, DEC)
    scheduler = make_scheduler(session_factory)
    report = scheduler.run_monthly(datetime(2025, 2, 1, 0, 30, tzinfo=UTC))
    assert (report.key, report.enqueued) == ("monthly-invoices:2025-01", 4)
    assert sorted(
        (c["tenant_id"], c["currency"], c["period_start"], c["period_end"])
        for c in scheduler.send_invoice.calls
    ) == [
        ("a", "eur", JAN, FEB),
        ("a", "usd", JAN, FEB),
        ("b", "usd", JAN, FEB),
        ("c", "usd", JAN, FEB),
    ]


def test_two_schedulers_firing_at_once_enqueue_each_pair_once(
    session_factory, seeded, race
) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i}", 1, day + timedelta(minutes=i)) for i in range(40)])
    server = fakeredis.FakeServer()
    shared = Recorder()
    schedulers = [
        make_scheduler(
            session_factory,
            lock=RedisFireLock(fakeredis.FakeRedis(server=server), namespace="test"),
            send_aggregate=shared,
        )
        for _ in range(2)
    ]

    def fire(index: int) -> bool:
        try:
            return schedulers[index].run_daily(day + timedelta(days=1, minutes=10)).claimed
        except FireBusy:  # the other one was still enqueueing: this one looks again later
            return False

    assert sorted(race(2, fire)) == [False, True]
    assert len(shared.calls) == 40
    assert len(set(pairs(shared))) == 40


@pytest.fixture(params=["local", "fakeredis"])
def fire_lock(request):
    if request.param == "local":
        return LocalFireLock()
    return RedisFireLock(fakeredis.FakeRedis(server=fakeredis.FakeServer()), namespace="t")


def test_a_fire_left_unfinished_by_a_dead_scheduler_runs_again_once_its_lease_ends(
    session_factory, seeded, fire_lock
) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])
    settings = WorkerSettings(fire_lease=timedelta(milliseconds=200))
    fire = day + timedelta(days=1, minutes=10)
    key = "aggregate-daily:" + day.date().isoformat()
    assert fire_lock.claim(key, settings.fire_lease)  # a scheduler claimed it, then died
    sent = Recorder()
    scheduler = make_scheduler(session_factory, fire_lock, settings, send_aggregate=sent)
    assert scheduler.run_daily(fire).claimed  # waited out the dead one's lease, then ran it
    assert len(sent.calls) >= 1
    again = Recorder()
    later = make_scheduler(session_factory, fire_lock, settings, send_aggregate=again)
    # Past the lease, on the lock's own clock: a lease taken after the fire finished has run
    # out, so the fire's key outlives a lease only because it is marked done.
    probe = "probe:" + key
    assert fire_lock.claim(probe, settings.fire_lease)
    wait_until(lambda: fire_lock.claim(probe, settings.fire_lease), 10, what="the lease's end")
    assert not later.run_daily(fire).claimed
    assert again.calls == []


def test_catch_up_runs_what_was_missed_and_only_once(session_factory, seeded) -> None:
    seeded([("t1", 1, datetime(2025, 1, 2, 9, tzinfo=UTC))], plan_for=("t1",))
    now = datetime(2025, 1, 3, 5, 0, tzinfo=UTC)  # down since before Jan 1st
    server = fakeredis.FakeServer()
    lock = RedisFireLock(fakeredis.FakeRedis(server=server), namespace="test")
    scheduler = make_scheduler(session_factory, lock=lock, now=lambda: now)
    reports = scheduler.catch_up()
    assert [(r.key, r.enqueued) for r in reports] == [
        ("aggregate-daily:2025-01-02", 1),
        ("monthly-invoices:2024-12", 1),
    ]
    restarted = make_scheduler(session_factory, lock=lock, now=lambda: now)
    assert [r.claimed for r in restarted.catch_up()] == [False, False]
    assert restarted.send_aggregate.calls == []


def test_a_broker_outage_during_the_fan_out_is_waited_out(session_factory, seeded) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i}", 1, day) for i in range(5)])
    flaky = Recorder(fail_first=7)
    scheduler = make_scheduler(session_factory, send_aggregate=flaky)
    assert scheduler.run_daily(day + timedelta(days=1)).enqueued == 5
    assert len(flaky.calls) == 5


def test_a_fire_that_fails_gives_its_claim_back(session_factory, seeded) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])
    settings = WorkerSettings(enqueue_retry_for=timedelta(0))
    lock = LocalFireLock()
    down = make_scheduler(
        session_factory, lock=lock, settings=settings, send_aggregate=Recorder(fail_first=1000)
    )
    with pytest.raises(redis.ConnectionError):
        down.run_daily(day + timedelta(days=1))
    back = make_scheduler(session_factory, lock=lock)
    assert back.run_daily(day + timedelta(days=1)).enqueued == 1


def test_stopping_interrupts_the_fan_out_and_gives_the_claim_back(session_factory, seeded) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i}", 1, day) for i in range(3)])
    lock = LocalFireLock()
    scheduler = make_scheduler(session_factory, lock=lock)
    scheduler.stop()
    counted = ("billing_scheduler_fires_total", {"job": DAILY_JOB_ID, "outcome": "interrupted"})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    with pytest.raises(FireInterrupted, match="^scheduler stopping$"):
        scheduler.run_daily(day + timedelta(days=1))
    assert REGISTRY.get_sample_value(*counted) == before + 1
    assert lock.claim("aggregate-daily:2025-01-03", timedelta(hours=1))


def test_the_jobs_have_fixed_ids_and_safe_options(session_factory) -> None:
    scheduler = make_scheduler(session_factory)
    aps = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(aps)
    jobs = {job.id: job for job in aps.get_jobs()}
    assert set(jobs) == {
        DAILY_JOB_ID,
        MONTHLY_JOB_ID,
        CATCH_UP_JOB_ID,
        PARTITIONS_JOB_ID,
        f"{PARTITIONS_JOB_ID}.start",
    }
    for job_id in (DAILY_JOB_ID, MONTHLY_JOB_ID, PARTITIONS_JOB_ID):
        job = jobs[job_id]
        assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, 3600)
        assert str(job.trigger.timezone) == "UTC"
    assert (
        str(jobs[DAILY_JOB_ID].trigger)
        == "cron[month='*', day='*', day_of_week='*', hour='*', minute='10']"
    )
    assert (
        str(jobs[MONTHLY_JOB_ID].trigger)
        == "cron[month='*', day='1,2', day_of_week='*', hour='*', minute='30']"
    )


def test_the_scheduler_sends_real_messages_through_the_actors(
    session_factory, seeded, stub_broker
) -> None:
    seeded([("t1", 1, datetime(2025, 1, 3, tzinfo=UTC))])
    scheduler = BillingScheduler(WorkerSettings(), session_factory, LocalFireLock())
    scheduler.run_daily(datetime(2025, 1, 4, 0, 10, tzinfo=UTC))
    [message] = list(stub_broker.queues[QUEUE_NAME].queue)
    assert b'"day_start":"2025-01-03T00:00:00+00:00"' in message


def test_a_failed_fire_is_retried_a_minute_later_with_the_same_fire_time(
    session_factory, seeded
) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])
    now = day + timedelta(days=1, minutes=10)
    settings = WorkerSettings(enqueue_retry_for=timedelta(0))
    scheduler = make_scheduler(
        session_factory,
        settings=settings,
        send_aggregate=Recorder(fail_first=1000),
        now=lambda: now,
    )
    aps = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(aps, catch_up=False)
    scheduler._job(DAILY_JOB_ID)  # what APScheduler calls at the fire time
    retry = aps.get_job(f"{DAILY_JOB_ID}.retry")
    assert retry is not None
    assert retry.args == (DAILY_JOB_ID, now)
    assert retry.trigger.run_date == now + timedelta(minutes=1)
    assert retry.misfire_grace_time is None  # run however late it gets to run, not dropped


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_the_fan_out_streams_every_pair_once_whatever_the_batch_size(
    session_factory, seeded, batch_size
) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i % 5}", i + 1, day + timedelta(minutes=i)) for i in range(5)])
    with session_factory.begin() as session:
        from billing import BillingService

        for i in range(4):
            BillingService(session=session, tenant_id=f"t{i}").record_usage(
                metric="calls", amount=1, at=day, idempotency_key=f"c{i}"
            )
    scheduler = make_scheduler(
        session_factory, settings=WorkerSettings(fanout_batch_size=batch_size)
    )
    assert scheduler.fan_out_days([day]) == 9
    sent = [(c["tenant_id"], c["metric"]) for c in scheduler.send_aggregate.calls]
    assert sorted(sent) == sorted(
        {(f"t{i}", "tokens") for i in range(5)} | {(f"t{i}", "calls") for i in range(4)}
    )


@pytest.mark.parametrize(("lease", "step"), [(30.0, 0.5), (1.0, 0.25)])
def test_a_fire_still_held_after_two_leases_is_looked_at_again_a_minute_later(
    session_factory, seeded, clock, caplog, lease, step
) -> None:
    """The waiting run looks again every quarter lease (half a second at most) for two leases;
    then it gives up and APScheduler is asked to run the fire again a minute later."""
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])
    now = day + timedelta(days=1, minutes=10)
    settings = WorkerSettings(fire_lease=timedelta(seconds=lease))
    lock = LocalFireLock(clock=clock)
    key = "aggregate-daily:2025-01-03"
    assert lock.claim(key, settings.fire_lease)  # another run, slow but alive
    steps: set[float] = set()

    def the_holder_renews_while_we_wait(seconds: float) -> None:
        steps.add(seconds)
        clock.sleep(seconds)
        assert lock.renew(key, settings.fire_lease)

    sent = Recorder()
    scheduler = make_scheduler(
        session_factory,
        lock,
        settings,
        send_aggregate=sent,
        now=lambda: now,
        sleep=the_holder_renews_while_we_wait,
        monotonic=clock,
    )
    aps = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(aps, catch_up=False)
    started = clock()
    with pytest.raises(FireBusy):
        scheduler.run_daily(now)
    assert 2 * lease < clock() - started <= 2 * lease + step  # waited two leases
    assert steps == {step}
    with caplog.at_level("INFO", logger="workers.scheduler"):
        scheduler._job(DAILY_JOB_ID)  # what APScheduler calls at the fire time
    retry = aps.get_job(f"{DAILY_JOB_ID}.retry")
    assert retry is not None
    assert retry.args == (DAILY_JOB_ID, now)
    assert retry.trigger.run_date == now + timedelta(minutes=1)
    assert sent.calls == []
    busy = f"{key} is being enqueued by another scheduler run"
    assert f"{DAILY_JOB_ID}: {busy}; looking again in 0:01:00" in [
        r.getMessage() for r in caplog.records
    ]


def test_a_fire_that_fails_while_stopping_is_not_retried(session_factory, seeded) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])
    now = day + timedelta(days=1, minutes=10)

    def fails_as_the_scheduler_stops(**_payload) -> None:
        scheduler.stop()
        raise RuntimeError("the broker rejected it")

    scheduler = make_scheduler(
        session_factory, send_aggregate=fails_as_the_scheduler_stops, now=lambda: now
    )
    aps = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(aps, catch_up=False)
    scheduler._job(DAILY_JOB_ID)
    assert aps.get_job(f"{DAILY_JOB_ID}.retry") is None


def test_a_long_fan_out_keeps_its_lease(session_factory, seeded, clock) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i}", 1, day) for i in range(5)])
    settings = WorkerSettings(fire_lease=timedelta(seconds=30))
    lock = LocalFireLock(clock=clock)
    key = "aggregate-daily:" + day.date().isoformat()

    def slow_send(**_payload) -> None:
        clock.advance(settings.fire_lease * 0.4)  # 5 sends: two leases in all
        assert not lock.claim(key, settings.fire_lease)  # nobody else can take it

    scheduler = make_scheduler(
        session_factory, lock, settings, send_aggregate=slow_send, monotonic=clock
    )
    assert scheduler.run_daily(day + timedelta(days=1, minutes=10)).enqueued == 5
    assert lock.is_done(key)


def test_a_fan_out_that_lost_its_lease_stops_and_leaves_the_new_holder_alone(
    session_factory, seeded, clock
) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i}", 1, day) for i in range(5)])
    settings = WorkerSettings(fire_lease=timedelta(seconds=30))
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    mine = RedisFireLock(client, namespace="t")
    theirs = RedisFireLock(client, namespace="t")
    key = "aggregate-daily:" + day.date().isoformat()
    sent = Recorder()

    def stalls_once(**payload) -> None:
        sent(**payload)
        if len(sent.calls) == 1:
            clock.advance(settings.fire_lease * 2)  # a stall: the lease runs out ...
            client.delete(mine.prefix + key)
            assert theirs.claim(key, settings.fire_lease)  # ... and another run claims it

    scheduler = make_scheduler(
        session_factory, mine, settings, send_aggregate=stalls_once, monotonic=clock
    )
    lost = f"^{key}: the lease ran out and another scheduler run took it$"  # _job logs it
    with pytest.raises(FireBusy, match=lost):
        scheduler.run_daily(day + timedelta(days=1, minutes=10))
    assert len(sent.calls) == 1  # stopped at once
    assert client.get(mine.prefix + key) == theirs.owner.encode()  # theirs, not released


def test_a_fan_out_whose_lease_lapsed_unclaimed_claims_it_again_and_goes_on(
    session_factory, seeded, clock
) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i}", 1, day) for i in range(5)])
    settings = WorkerSettings(fire_lease=timedelta(seconds=30))
    lock = LocalFireLock(clock=clock)
    sent = Recorder()

    def stalls_once(**payload) -> None:
        sent(**payload)
        if len(sent.calls) == 1:
            clock.advance(settings.fire_lease * 2)  # the lease runs out; nobody claims it

    scheduler = make_scheduler(
        session_factory, lock, settings, send_aggregate=stalls_once, monotonic=clock
    )
    assert scheduler.run_daily(day + timedelta(days=1, minutes=10)).enqueued == 5
    assert lock.is_done("aggregate-daily:" + day.date().isoformat())


def test_with_a_redis_url_fires_are_locked_in_redis_under_the_namespace() -> None:
    settings = WorkerSettings(redis_url="redis://127.0.0.1:6399/2", namespace="acme")
    lock = make_lock(settings)
    assert isinstance(lock, RedisFireLock)
    assert lock.prefix == "acme:scheduler:"
    options = lock.client.connection_pool.connection_kwargs
    assert (options["port"], options["db"]) == (6399, 2)
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (10, 10)


def test_without_redis_fires_are_locked_in_process_with_a_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="workers.scheduler"):
        lock = make_lock(WorkerSettings())
    assert isinstance(lock, LocalFireLock)
    assert [r.getMessage() for r in caplog.records] == [
        "no REDIS_URL: fire locks are in-process; run one scheduler only"
    ]


def test_the_deployed_schedule_takes_the_invoice_policy_of_the_billing_settings() -> None:
    database = BillingSettings(
        database_url="sqlite://",
        invoice_grace_period=timedelta(days=3),
        late_usage_lookback=timedelta(days=40),
    )
    factory: sessionmaker = sessionmaker()
    billing, aps = deployed_schedule(WorkerSettings(), database, factory)
    assert billing.session_factory is factory  # its fan-outs read the deployment's database
    assert (billing.grace_period, billing.late_usage_lookback) == (DAY * 3, DAY * 40)
    assert isinstance(billing.lock, LocalFireLock)
    assert (aps.timezone, aps.state) == (UTC, STATE_STOPPED)
    assert {job.id for job in aps.get_jobs()} >= {DAILY_JOB_ID, MONTHLY_JOB_ID, FINALIZE_JOB_ID}
    ignoring = BillingSettings(database_url="sqlite://", late_usage="ignore")
    billing, _ = deployed_schedule(WorkerSettings(), ignoring, sessionmaker())
    assert (billing.grace_period, billing.late_usage_lookback) == (timedelta(0), None)


def test_removing_a_missing_job_fails_only_while_the_scheduler_runs() -> None:
    aps = StoppableScheduler(timezone=UTC)
    aps.start(paused=True)
    try:
        with pytest.raises(JobLookupError):
            aps.remove_job("missing")
    finally:
        aps.shutdown(wait=False)
    aps.remove_job("missing")  # stopped: what a shutdown racing the catch-up job's removal does


def test_a_retry_fans_out_the_fire_time_it_was_given_not_the_latest(
    session_factory, seeded
) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)], plan_for=("t1",))
    now = datetime(2025, 3, 10, 1, tzinfo=UTC)  # the retry runs long after
    lock = LocalFireLock()
    sync = Recorder()
    scheduler = make_scheduler(session_factory, lock, now=lambda: now, send_sync=sync)
    scheduler._job(DAILY_JOB_ID, day + timedelta(days=1, minutes=10))
    scheduler._job(MONTHLY_JOB_ID, FEB + timedelta(minutes=30))
    sweep = datetime(2025, 1, 5, 7, tzinfo=UTC)
    scheduler._job(SYNC_JOB_ID, sweep)
    assert pairs(scheduler.send_aggregate) == [("t1", "tokens", day)]
    invoiced = [(c["tenant_id"], c["period_start"]) for c in scheduler.send_invoice.calls]
    assert invoiced == [("t1", JAN)]
    assert lock.is_done("sync-pending-invoices:2025-01-05T07:00")


def test_each_outcome_of_a_fire_is_logged_with_its_job(session_factory, seeded, caplog) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])
    now = day + timedelta(days=1, minutes=10)
    settings = WorkerSettings(enqueue_retry_for=timedelta(0))
    failing = make_scheduler(
        session_factory, settings=settings, send_aggregate=Recorder(fail_first=1), now=lambda: now
    )
    stopped = make_scheduler(session_factory, now=lambda: now)
    stopped.stop()
    with caplog.at_level("INFO", logger="workers.scheduler"):
        failing._job(DAILY_JOB_ID)
        stopped._job(DAILY_JOB_ID)
    assert [r.getMessage() for r in caplog.records if r.levelname != "INFO"] == [
        f"{DAILY_JOB_ID} failed; retrying in 0:01:00",
        f"{DAILY_JOB_ID} interrupted by shutdown; the next start runs it again",
    ]


def test_a_fire_failing_again_keeps_one_retry(session_factory, seeded) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])
    now = day + timedelta(days=1, minutes=10)
    settings = WorkerSettings(enqueue_retry_for=timedelta(0))
    scheduler = make_scheduler(
        session_factory, settings=settings, send_aggregate=Recorder(fail_first=9), now=lambda: now
    )
    aps = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(aps, catch_up=False)
    aps.start(paused=True)
    try:
        scheduler._job(DAILY_JOB_ID)
        scheduler._job(DAILY_JOB_ID)  # the retry failed too: it replaces itself
        retries = [job for job in aps.get_jobs() if job.id == f"{DAILY_JOB_ID}.retry"]
        assert len(retries) == 1
    finally:
        aps.shutdown(wait=False)


def test_scheduling_again_replaces_the_jobs_and_each_job_runs_its_own_fire(
    session_factory, seeded
) -> None:
    seeded([("t1", 1, datetime(2025, 1, 31, 9, tzinfo=UTC))], plan_for=("t1",))
    now = datetime(2025, 2, 1, 0, 40, tzinfo=UTC)
    scheduler = make_scheduler(
        session_factory,
        settings=WorkerSettings(provider_sync="billing_hooks:stripe_sync"),
        now=lambda: now,
        send_sync=Recorder(),
        send_finalize=Recorder(),
        grace_period=DAY,
    )
    aps = BackgroundScheduler(timezone=UTC)
    aps.start(paused=True)
    try:
        scheduler.schedule(aps)
        scheduler.schedule(aps)  # a restart against a persistent job store
        jobs = {job.id: job for job in aps.get_jobs()}
        assert {job_id: job.args for job_id, job in jobs.items()} == {
            job_id: (job_id.removesuffix(".start"),)
            for job_id in (DAILY_JOB_ID, MONTHLY_JOB_ID, SYNC_JOB_ID, FINALIZE_JOB_ID)
            + (CATCH_UP_JOB_ID, PARTITIONS_JOB_ID, f"{PARTITIONS_JOB_ID}.start")
        }
        assert jobs[CATCH_UP_JOB_ID].trigger.run_date == now
        assert jobs[f"{PARTITIONS_JOB_ID}.start"].trigger.run_date == now
        for job_id in (DAILY_JOB_ID, MONTHLY_JOB_ID):
            jobs[job_id].func(*jobs[job_id].args)  # what APScheduler calls at the fire time
    finally:
        aps.shutdown(wait=False)
    assert pairs(scheduler.send_aggregate) == [("t1", "tokens", datetime(2025, 1, 31, tzinfo=UTC))]
    assert [c["period_start"] for c in scheduler.send_invoice.calls] == [JAN]


def test_catch_up_runs_the_fires_due_when_it_started(session_factory, seeded) -> None:
    """The clock is read once: a catch-up that runs past the next fire still runs the fires
    that were due when it started (the next ones are the cron jobs')."""
    seeded([("t1", 1, datetime(2025, 1, 2, 9, tzinfo=UTC))], plan_for=("t1",))
    readings = iter(datetime(2025, 1, 3, 5, tzinfo=UTC) + timedelta(days=i) for i in range(99))
    scheduler = make_scheduler(session_factory, now=lambda: next(readings))
    assert [r.key for r in scheduler.catch_up()] == [
        "aggregate-daily:2025-01-02",
        "monthly-invoices:2024-12",
    ]


def test_removing_a_job_removes_it_from_the_job_store_named() -> None:
    aps = StoppableScheduler(timezone=UTC)
    aps.add_jobstore("memory", alias="other")
    aps.start(paused=True)
    try:
        aps.add_job(print, "date", id="kept", run_date=JAN)
        aps.add_job(print, "date", id="gone", run_date=JAN, jobstore="other")
        with pytest.raises(JobLookupError):
            aps.remove_job("kept", "other")
        aps.remove_job("gone", "other")
        assert [job.id for job in aps.get_jobs()] == ["kept"]
    finally:
        aps.shutdown(wait=False)


def test_last_fire_time_looks_back_62_days() -> None:
    yearly = CronTrigger.from_crontab("0 0 1 1 *", timezone=UTC)
    assert last_fire_time(yearly, JAN + timedelta(days=61, hours=23)) == JAN
    assert last_fire_time(yearly, JAN + timedelta(days=62, hours=1)) is None


def test_without_a_fire_time_the_monthly_fire_is_the_latest_one(session_factory) -> None:
    now = datetime(2025, 2, 2, 5, tzinfo=UTC)
    report = make_scheduler(session_factory, now=lambda: now).run_monthly()
    assert report.key == "monthly-invoices:2025-01"


def test_a_zone_ahead_of_utc_fires_for_its_own_month(session_factory, seeded) -> None:
    """Tokyo's January starts on December 31st in UTC; its key names January."""
    seeded([], plan_for=("tokyo",))
    with session_factory.begin() as session:
        set_tenant(session, "tokyo", timezone="Asia/Tokyo")
    scheduler = make_scheduler(session_factory)
    counted = ("billing_scheduler_enqueued_total", {"job": MONTHLY_JOB_ID})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    report = scheduler.run_monthly(datetime(2025, 2, 1, 0, 30, tzinfo=UTC))
    assert REGISTRY.get_sample_value(*counted) == before + 1
    assert [(z.key, z.enqueued) for z in report.zones] == [
        ("monthly-invoices:Asia/Tokyo:2025-01", 1)
    ]


def test_late_usage_is_looked_for_as_far_back_as_the_lookback(session_factory) -> None:
    now = datetime(2025, 3, 10, tzinfo=UTC)
    billing = make_scheduler(session_factory, now=lambda: now, late_usage_lookback=DAY * 60)
    assert billing.late_since() == now - DAY * 60
    assert make_scheduler(session_factory, now=lambda: now).late_since() is None


def test_a_claim_that_cannot_be_given_back_is_logged(session_factory, seeded, caplog) -> None:
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([("t1", 1, day)])

    class Unreleasable(LocalFireLock):
        def release(self, key: str) -> None:
            raise redis.ConnectionError("Connection refused")

    settings = WorkerSettings(enqueue_retry_for=timedelta(0))
    scheduler = make_scheduler(
        session_factory, Unreleasable(), settings, send_aggregate=Recorder(fail_first=1)
    )
    with (
        caplog.at_level("WARNING", logger="workers.scheduler"),
        pytest.raises(redis.ConnectionError),
    ):
        scheduler.run_daily(day + timedelta(days=1, minutes=10))
    assert "could not release aggregate-daily:2025-01-03; it is claimed until it expires" in [
        r.getMessage() for r in caplog.records
    ]


def test_the_late_event_windows_days_are_the_zones_own_days(session_factory) -> None:
    """Each day of the window is a local day of the zone (New York's 23-hour March 9th
    included), not a UTC day."""
    scheduler = make_scheduler(session_factory, settings=WorkerSettings(late_event_window_days=2))
    days = scheduler.days_to_aggregate(datetime(2025, 3, 11, 4, 10, tzinfo=UTC), "America/New_York")
    assert [day.isoformat() for day in days] == [
        "2025-03-10T00:00:00-04:00",
        "2025-03-09T00:00:00-05:00",
        "2025-03-08T00:00:00-05:00",
    ]
    days = scheduler.days_to_aggregate(datetime(2025, 3, 10, 19, 10, tzinfo=UTC), "Asia/Kathmandu")
    assert [day.isoformat() for day in days] == [
        "2025-03-10T00:00:00+05:45",
        "2025-03-09T00:00:00+05:45",
        "2025-03-08T00:00:00+05:45",
    ]


@pytest.mark.parametrize(
    ("created", "logged"),
    [
        (
            ["usage_events_2025_04", "usage_events_2025_05"],
            "usage_events_2025_04, usage_events_2025_05",
        ),
        ([], "nothing"),
    ],
)
def test_the_partitions_job_makes_the_months_ahead_in_a_committed_transaction(
    session_factory, monkeypatch, caplog, created, logged
) -> None:
    """The DDL itself runs on PostgreSQL only (`tests/integration/billing/test_partitions.py`);
    here `ensure_partitions` is replaced to see what the job hands it and does with its answer."""
    now = datetime(2025, 3, 10, tzinfo=UTC)
    calls: list[tuple[datetime, int]] = []

    def ensure_partitions(connection: Connection, *, now: datetime, ahead: int) -> list[str]:
        connection.execute(insert(Tenant).values(id="probe", name="probe"))
        calls.append((now, ahead))
        return created

    monkeypatch.setattr("workers.scheduler.ensure_partitions", ensure_partitions)
    settings = WorkerSettings(partitions_ahead=5)
    scheduler = make_scheduler(session_factory, settings=settings, now=lambda: now)
    counted = ("billing_scheduler_fires_total", {"job": PARTITIONS_JOB_ID, "outcome": "enqueued"})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    with caplog.at_level("INFO", logger="workers.scheduler"):
        assert scheduler.run_partitions() == created
    assert calls == [(now, 5)]
    assert REGISTRY.get_sample_value(*counted) == before + 1
    assert f"billing.usage-partitions: created {logged}" in [r.getMessage() for r in caplog.records]
    with session_factory() as session:  # what it wrote was committed
        assert session.get(Tenant, "probe") is not None


def test_a_fan_out_renews_its_lease_every_third_of_a_lease(session_factory, seeded, clock) -> None:
    """The first renewal comes a third of a lease after the claim, at that instant exactly,
    then one every third of a lease: the lease never gets near running out."""
    day = datetime(2025, 1, 3, tzinfo=UTC)
    seeded([(f"t{i:02d}", 1, day) for i in range(35)])
    settings = WorkerSettings(fire_lease=timedelta(seconds=30))
    renewed: list[float] = []

    class Renewals(LocalFireLock):
        def renew(self, key: str, lease: timedelta) -> bool:
            renewed.append(clock())
            return super().renew(key, lease)

    def one_second_each(**_payload) -> None:
        clock.advance(timedelta(seconds=1))

    scheduler = make_scheduler(
        session_factory,
        Renewals(clock=clock),
        settings,
        send_aggregate=one_second_each,
        monotonic=clock,
    )
    started = clock()
    assert scheduler.run_daily(day + timedelta(days=1, minutes=10)).enqueued == 35
    assert [at - started for at in renewed] == [10.0, 20.0, 30.0]


def test_a_fire_whose_claim_fails_is_counted_as_failed(session_factory) -> None:
    class Unreachable(LocalFireLock):
        def claim(self, key: str, ttl: timedelta) -> bool:
            raise redis.ConnectionError("Connection refused")

    settings = WorkerSettings(enqueue_retry_for=timedelta(0))
    scheduler = make_scheduler(session_factory, Unreachable(), settings)
    counted = ("billing_scheduler_fires_total", {"job": DAILY_JOB_ID, "outcome": "failed"})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    with pytest.raises(redis.ConnectionError):
        scheduler.run_daily(datetime(2025, 1, 4, 0, 10, tzinfo=UTC))
    assert REGISTRY.get_sample_value(*counted) == before + 1


def test_a_fire_done_already_is_skipped_with_a_line_naming_it(
    session_factory, seeded, caplog
) -> None:
    seeded([("t1", 1, datetime(2025, 1, 3, tzinfo=UTC))])
    scheduler = make_scheduler(session_factory)
    fire = datetime(2025, 1, 4, 0, 10, tzinfo=UTC)
    assert scheduler.run_daily(fire).claimed
    with caplog.at_level("INFO", logger="workers.scheduler"):
        skipped = scheduler.run_daily(fire)
    assert (skipped.job_id, skipped.claimed) == (DAILY_JOB_ID, False)
    assert [r.getMessage() for r in caplog.records] == [
        f"{DAILY_JOB_ID}: aggregate-daily:2025-01-03 already claimed by another scheduler run;"
        " skipped"
    ]


def test_without_a_fire_time_the_daily_fire_is_the_latest_one_and_its_sends_are_counted(
    session_factory, seeded
) -> None:
    seeded([("t1", 1, datetime(2025, 1, 3, 9, tzinfo=UTC))])
    now = datetime(2025, 1, 4, 5, tzinfo=UTC)  # the last fire was at 04:10: January 3rd is over
    counted = ("billing_scheduler_enqueued_total", {"job": DAILY_JOB_ID})
    before = REGISTRY.get_sample_value(*counted) or 0.0
    report = make_scheduler(session_factory, now=lambda: now).run_daily()
    assert (report.key, report.enqueued) == ("aggregate-daily:2025-01-03", 1)
    assert REGISTRY.get_sample_value(*counted) == before + 1


def test_an_enqueued_fire_is_logged_with_its_fields_and_reports_its_duration(
    session_factory, seeded, caplog
) -> None:
    seeded([("t1", 1, datetime(2025, 1, 3, tzinfo=UTC))])
    with caplog.at_level("INFO", logger="workers.scheduler"):
        report = make_scheduler(session_factory).run_daily(datetime(2025, 1, 4, 0, 10, tzinfo=UTC))
    assert 0 < report.seconds < 60
    [line] = caplog.records
    assert re.fullmatch(
        rf"{DAILY_JOB_ID}: aggregate-daily:2025-01-03 enqueued 1 messages in \d+\.\d s",
        line.getMessage(),
    )
    fields = {name: getattr(line, name) for name in ("fire", "key", "enqueued", "duration_ms")}
    assert fields == {
        "fire": DAILY_JOB_ID,
        "key": "aggregate-daily:2025-01-03",
        "enqueued": 1,
        "duration_ms": report.seconds * 1000,
    }


def test_once_its_fire_is_over_a_scheduler_holds_no_lease(session_factory, seeded, clock) -> None:
    """Waiting on another run's fire afterwards (past the first fire's renewal time) renews
    nothing and claims nothing: Redis holds the two fires' keys only."""
    seeded([("t1", 1, datetime(2025, 1, 3, tzinfo=UTC))])
    settings = WorkerSettings(fire_lease=timedelta(seconds=30))
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    mine, theirs = (RedisFireLock(client, namespace="t") for _ in range(2))
    second = "aggregate-daily:2025-01-04"

    def the_holder_finishes(seconds: float) -> None:
        clock.sleep(seconds)
        theirs.finish(second, timedelta(days=1))

    scheduler = make_scheduler(
        session_factory, mine, settings, sleep=the_holder_finishes, monotonic=clock
    )
    assert scheduler.run_daily(datetime(2025, 1, 4, 0, 10, tzinfo=UTC)).claimed
    clock.advance(settings.fire_lease)  # past when the first fire would have renewed
    assert theirs.claim(second, settings.fire_lease)
    assert not scheduler.run_daily(datetime(2025, 1, 5, 0, 10, tzinfo=UTC)).claimed
    assert sorted(client.keys()) == [
        b"t:scheduler:aggregate-daily:2025-01-03",
        b"t:scheduler:aggregate-daily:2025-01-04",
    ]


class ClockedLines(logging.Handler):
    """Notes the fake clock's reading at each line logged."""

    def __init__(self, clock) -> None:
        super().__init__()
        self.clock = clock
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((self.clock(), record.getMessage()))


@pytest.mark.parametrize("started_at", [0.0, 1000.0])
def test_a_broker_outage_is_retried_with_doubling_delays_and_a_warning_every_10_seconds(
    session_factory, seeded, clock, started_at
) -> None:
    """Delays of 0.2 s doubling up to 5 s; a warning at the first failure (whatever the clock
    reads) and then once more than 10 s passed; given up at `ENQUEUE_RETRY_FOR` exactly. The
    clock moves 1 s per sleep whatever was asked, so the checks fall on whole seconds."""
    seeded([("t1", 1, datetime(2025, 1, 3, tzinfo=UTC))])
    clock.now = started_at
    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        clock.advance(timedelta(seconds=1))

    down = Recorder(fail_first=1000)
    settings = WorkerSettings(enqueue_retry_for=timedelta(seconds=25))
    scheduler = make_scheduler(
        session_factory, settings=settings, send_aggregate=down, sleep=sleep, monotonic=clock
    )
    lines = ClockedLines(clock)
    logger = logging.getLogger("workers.scheduler")
    logger.addHandler(lines)
    try:
        with pytest.raises(redis.ConnectionError):
            scheduler.run_daily(datetime(2025, 1, 4, 0, 10, tzinfo=UTC))
    finally:
        logger.removeHandler(lines)
    assert asked == [0.2, 0.4, 0.8, 1.6, 3.2] + [5.0] * 20  # at 25 s it gives up
    assert 1000 - down.fail_first == 26
    warning = "broker unreachable (Connection refused); retrying until it is back"
    assert [(at - started_at, line) for at, line in lines.lines if line == warning] == [
        (0.0, warning),
        (11.0, warning),
        (22.0, warning),
    ]


@pytest.mark.parametrize("given", ["send_aggregate", "send_invoice"])
def test_a_sender_not_given_sends_through_the_actors(
    session_factory, seeded, stub_broker, given
) -> None:
    """Each of the two senders defaults to its actor on its own: giving one keeps the other."""
    seeded([("t1", 1, datetime(2025, 1, 3, tzinfo=UTC))], plan_for=("t1",))
    recorder = Recorder()
    scheduler = BillingScheduler(
        WorkerSettings(), session_factory, LocalFireLock(), **{given: recorder}
    )
    scheduler.run_daily(datetime(2025, 1, 4, 0, 10, tzinfo=UTC))
    scheduler.run_monthly(datetime(2025, 2, 1, 0, 30, tzinfo=UTC))
    [message] = list(stub_broker.queues[QUEUE_NAME].queue)
    [call] = recorder.calls
    if given == "send_aggregate":
        assert call["day_start"] == datetime(2025, 1, 3, tzinfo=UTC)
        assert b'"period_start":"2025-01-01T00:00:00+00:00"' in message
    else:
        assert call["period_start"] == datetime(2025, 1, 1, tzinfo=UTC)
        assert b'"day_start":"2025-01-03T00:00:00+00:00"' in message


def test_every_job_fires_on_utc_whatever_the_machines_zone(session_factory) -> None:
    """With the invoice sync and the finalize sweep on, every cron job's trigger is in UTC (a
    trigger without a zone takes the machine's: `Etc/UTC` here, anything elsewhere)."""
    settings = WorkerSettings(provider_sync="billing_hooks:stripe_sync")
    scheduler = make_scheduler(session_factory, settings=settings, grace_period=DAY)
    aps = BackgroundScheduler(timezone=UTC)
    scheduler.schedule(aps, catch_up=False)
    zones = {job.id: str(job.trigger.timezone) for job in aps.get_jobs()}
    assert zones == {
        job_id: "UTC"
        for job_id in (
            DAILY_JOB_ID,
            MONTHLY_JOB_ID,
            SYNC_JOB_ID,
            FINALIZE_JOB_ID,
            PARTITIONS_JOB_ID,
        )
    }
