"""Properties of the per-zone fan-out: whatever the events and zones, hourly fires (from one
scheduler or two racing ones) leave each tenant one aggregate per local day with usage, equal
to a recomputation over its raw events, each (tenant, day) enqueued once. On SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from billing import BillingService
from billing.db import make_engine, make_session_factory
from billing.localtime import local_day
from billing.migrate import upgrade
from billing.models import UsageAggregate
from billing.tenants import set_tenant
from tests.conftest import truncate_all
from workers.locks import RedisFireLock
from workers.scheduler import BillingScheduler, FireBusy
from workers.settings import WorkerSettings

from .test_zone_fanout import InlineJobs, at, hours

ZONES = ["UTC", "America/New_York", "Asia/Kathmandu", "Australia/Lord_Howe"]
START = at(2025, 11, 1)  # New York and Lord Howe change their clocks in the next days
SPAN = timedelta(days=3)

events = st.lists(
    st.tuples(
        st.integers(0, 3),  # tenant
        st.integers(0, int(SPAN.total_seconds()) - 1),  # seconds after START
        st.integers(1, 1000),  # amount
    ),
    min_size=1,
    max_size=30,
)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("zones") / "template.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path.read_bytes()


def fresh_factory(template: bytes, folder):
    path = folder / f"db-{threading.get_ident()}-{datetime.now().timestamp()}.sqlite3"
    path.write_bytes(template)
    return make_session_factory(make_engine(f"sqlite:///{path}"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def fresh(request, template, tmp_path) -> Callable[[], sessionmaker]:
    """`fresh()`: a session factory on an empty migrated database, one per Hypothesis example
    (a copy of a SQLite file; the PostgreSQL test database, truncated)."""
    if request.param == "sqlite":
        return lambda: fresh_factory(template, tmp_path)
    engine = request.getfixturevalue("pg_engine")

    def emptied() -> sessionmaker:
        truncate_all(engine)
        return make_session_factory(engine)

    return emptied


def seed(factory, zones: list[str], rows) -> dict[str, ZoneInfo]:
    tenants = {f"t{n}": ZoneInfo(zone) for n, zone in enumerate(zones)}
    with factory.begin() as session:
        for tenant, zone in tenants.items():
            if zone.key != "UTC":
                set_tenant(session, tenant, timezone=zone.key)
        for index, (n, offset, amount) in enumerate(rows):
            BillingService(session=session, tenant_id=f"t{n}").record_usage(
                metric="m",
                amount=amount,
                at=START + timedelta(seconds=offset),
                idempotency_key=f"e{index}",
            )
    return tenants


def expected(tenants: dict[str, ZoneInfo], rows, fired_until: datetime) -> dict:
    """The recomputation: each tenant's local day with usage that had ended by the last fire."""
    want: dict[tuple[str, datetime], int] = defaultdict(int)
    for n, offset, amount in rows:
        tenant = f"t{n}"
        day = local_day(tenants[tenant], START + timedelta(seconds=offset))
        if day.end <= fired_until:
            want[(tenant, day.start)] += amount
    return dict(want)


def stored(factory) -> dict:
    with factory() as session:
        rows = session.scalars(select(UsageAggregate))
        return {(row.tenant_id, row.period_start): row.total for row in rows}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(zones=st.lists(st.sampled_from(ZONES), min_size=4, max_size=4), rows=events)
def test_hourly_fires_aggregate_every_local_day_once_as_recomputed(fresh, zones, rows) -> None:
    factory = fresh()
    tenants = seed(factory, zones, rows)
    jobs = InlineJobs(factory)
    scheduler = BillingScheduler(
        WorkerSettings(late_event_window_days=0),
        factory,
        RedisFireLock(fakeredis.FakeRedis(server=fakeredis.FakeServer()), namespace="p"),
        send_aggregate=jobs.aggregate,
        send_invoice=jobs.invoice,
        sleep=lambda _s: None,
    )
    fires = hours(START + timedelta(minutes=10), START + SPAN + timedelta(hours=14, minutes=10))
    for fire in fires:
        scheduler.run_daily(fire)
    want = expected(tenants, rows, fires[-1])
    assert stored(factory) == want
    assert len(jobs.days) == len(set(jobs.days)) == len(want)


def test_two_racing_schedulers_enqueue_each_zones_day_once(fresh) -> None:
    factory = fresh()
    rows = [(n, 3600 * h, 1) for n in range(4) for h in range(0, 72, 5)]
    tenants = seed(factory, ZONES, rows)
    jobs = InlineJobs(factory)
    mutex = threading.Lock()

    def send(**kwargs) -> None:
        with mutex:
            jobs.aggregate(**kwargs)

    server = fakeredis.FakeServer()
    schedulers = [
        BillingScheduler(
            WorkerSettings(late_event_window_days=0),
            factory,
            RedisFireLock(fakeredis.FakeRedis(server=server), namespace="race"),
            send_aggregate=send,
            send_invoice=jobs.invoice,
        )
        for _ in range(2)
    ]
    fires = hours(START + timedelta(minutes=10), START + SPAN + timedelta(hours=14, minutes=10))

    def run(scheduler: BillingScheduler) -> None:
        for fire in fires:
            try:
                scheduler.run_daily(fire)
            except FireBusy:  # the other one still holds that fire: it enqueues it
                continue

    threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    want = expected(tenants, rows, fires[-1])
    assert len(jobs.days) == len(set(jobs.days)) == len(want)
    assert stored(factory) == want
