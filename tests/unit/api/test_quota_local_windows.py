"""Usage counters, quotas and the metric limit in the tenant's time zone: a New York or a
Kathmandu tenant's day and month begin at its local midnight, on SQLite and PostgreSQL; the
counters' SQL function agrees with `billing.localtime` across daylight saving changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text, update

from billing import BillingService, TooManyMetricsError
from billing.api.models import UsageCounter
from billing.counters import counter_period, recount
from billing.db import make_session_factory
from billing.localtime import local_day
from billing.migrate import downgrade, upgrade
from billing.models import Tenant, UsageEvent
from billing.quotas import check_quota, consume_quota, current_quotas
from billing.tenants import _lock_zone, set_tenant
from tests.unit.billing.test_ingest_postgresql import statements
from tests.unit.billing.test_localtime import ZONES as LOCALTIME_ZONES

from .test_quota_counters import counters, nonzero, record, subscribe

TICK = timedelta(microseconds=1)
DAY = timedelta(days=1)

# Each zone's April 1st, 2025 at local midnight, and its March and May firsts (in UTC).
ZONED = [
    pytest.param(
        "America/New_York",
        datetime(2025, 4, 1, 4, tzinfo=UTC),  # 2025-04-01T00:00:00-04:00
        datetime(2025, 3, 1, 5, tzinfo=UTC),
        datetime(2025, 5, 1, 4, tzinfo=UTC),
        id="new-york",
    ),
    pytest.param(
        "Asia/Kathmandu",
        datetime(2025, 3, 31, 18, 15, tzinfo=UTC),  # 2025-04-01T00:00:00+05:45
        datetime(2025, 2, 28, 18, 15, tzinfo=UTC),
        datetime(2025, 4, 30, 18, 15, tzinfo=UTC),
        id="kathmandu",
    ),
]


@pytest.mark.parametrize(("zone", "april", "march", "may"), ZONED)
def test_counters_are_keyed_by_the_tenants_local_day_and_month(
    session, zone, april, march, may
) -> None:
    set_tenant(session, "A", timezone=zone)
    record(session, amount=1, at=april - TICK)
    record(session, amount=10, at=april)
    assert counters(session) == {
        ("A", "tokens", "day", april - DAY): 1,
        ("A", "tokens", "month", march): 1,
        ("A", "tokens", "day", april): 10,
        ("A", "tokens", "month", april): 10,
    }


@pytest.mark.parametrize(("zone", "april", "march", "may"), ZONED)
def test_a_quota_resets_at_the_tenants_local_midnight_on_the_first(
    session, zone, april, march, may
) -> None:
    set_tenant(session, "A", timezone=zone)
    subscribe(
        session,
        limits=(("tokens", "day", 10), ("tokens", "month", 10)),
        effective_at=march,
    )
    record(session, amount=10, at=april - TICK)
    for window, reset in [("day", april), ("month", april)]:
        before = check_quota(session, tenant_id="A", key="tokens", window=window, now=april - TICK)
        assert (before.used, before.allowed, before.reset_at) == (10, False, reset)
    day = check_quota(session, tenant_id="A", key="tokens", window="day", now=april)
    month = check_quota(session, tenant_id="A", key="tokens", window="month", now=april)
    assert (day.used, day.allowed, day.reset_at) == (0, True, april + DAY)
    assert (month.used, month.allowed, month.reset_at) == (0, True, may)
    quotas = current_quotas(session, tenant_id="A", now=april)
    assert [(q.window, q.used, q.reset_at) for q in quotas] == [
        ("day", 0, april + DAY),
        ("month", 0, may),
    ]


@pytest.mark.parametrize(("zone", "april", "march", "may"), ZONED)
def test_consuming_at_the_local_month_boundary_counts_in_the_month_of_each_side(
    session, zone, april, march, may
) -> None:
    set_tenant(session, "A", timezone=zone)
    subscribe(session, limits=(("tokens", "month", 10),), effective_at=march)
    consume = {"tenant_id": "A", "key": "tokens", "window": "month", "amount": 6}
    assert consume_quota(session, **consume, now=april - 2 * TICK).allowed
    refused = consume_quota(session, **consume, now=april - TICK)
    assert (refused.allowed, refused.used, refused.reset_at) == (False, 6, april)
    accepted = consume_quota(session, **consume, now=april)
    assert (accepted.allowed, accepted.used, accepted.reset_at) == (True, 6, may)
    assert session.scalar(select(func.sum(UsageEvent.amount))) == 12


@pytest.mark.parametrize(("zone", "april", "march", "may"), ZONED)
def test_the_metric_limit_counts_the_metrics_of_the_local_month(
    session, zone, april, march, may
) -> None:
    set_tenant(session, "A", timezone=zone)
    service = BillingService(session=session, tenant_id="A", max_metrics_per_tenant=1)
    service.record_usage(metric="a", amount=1, at=april - TICK, idempotency_key="a")
    service.record_usage(metric="b", amount=1, at=april, idempotency_key="b-april")
    with pytest.raises(TooManyMetricsError, match=rf"in 2025-03 \({zone}\)") as refused:
        service.record_usage(metric="b", amount=1, at=april - TICK, idempotency_key="b-march")
    assert refused.value.month == march
    assert session.scalar(select(func.count()).select_from(UsageEvent)) == 2


def test_a_zone_change_counts_the_tenants_events_again_in_the_new_zone(session) -> None:
    april_ny = datetime(2025, 4, 1, 4, tzinfo=UTC)
    record(session, amount=1, at=april_ny - TICK)  # April 1st in UTC, March 31st in New York
    record(session, amount=2, at=april_ny)
    record(session, tenant="B", amount=5, at=april_ny - TICK)
    set_tenant(session, "A", timezone="America/New_York")
    assert nonzero(counters(session)) == {
        ("A", "tokens", "day", april_ny - DAY): 1,
        ("A", "tokens", "month", datetime(2025, 3, 1, 5, tzinfo=UTC)): 1,
        ("A", "tokens", "day", april_ny): 2,
        ("A", "tokens", "month", april_ny): 2,
        ("B", "tokens", "day", datetime(2025, 4, 1, tzinfo=UTC)): 5,
        ("B", "tokens", "month", datetime(2025, 4, 1, tzinfo=UTC)): 5,
    }
    set_tenant(session, "A", timezone="UTC")
    april_utc = datetime(2025, 4, 1, tzinfo=UTC)
    assert {k: v for k, v in counters(session).items() if k[0] == "A"} == {
        ("A", "tokens", "day", april_utc): 3,
        ("A", "tokens", "month", april_utc): 3,
    }


# --- the counters' period function against billing.localtime -------------------------------

ZONES = [*LOCALTIME_ZONES, "Asia/Beirut"]  # and midnight changes in Beirut


def changes(zone: str, years: range) -> list[datetime]:
    """The starts of the zone's local days that do not last 24 hours in `years`."""
    tz = ZoneInfo(zone)
    starts = []
    day = local_day(tz, datetime(years.start, 1, 1, 12, tzinfo=UTC))
    while day.start.year < years.stop:
        if day.end - day.start != DAY:
            starts.append(day.start)
        day = local_day(tz, day.end)
    return starts


def near_changes(zone: str) -> list[datetime]:
    """Instants around every irregular local day of 2024-2026: its start, end and inside."""
    moments = []
    for start in changes(zone, range(2024, 2027)):
        for hours in range(-2, 28):
            moment = start + timedelta(hours=hours)
            moments += [moment - TICK, moment, moment + timedelta(minutes=30)]
    return moments


@pytest.mark.postgres
@pytest.mark.parametrize("zone", ZONES)
def test_the_postgresql_period_function_cuts_days_and_months_as_localtime(pg_engine, zone) -> None:
    moments = near_changes(zone) or [datetime(2025, 1, 1, tzinfo=UTC)]
    query = text(
        "SELECT m, billing_period_start('day', m, :zone), billing_period_start('month', m, :zone) "
        "FROM unnest(CAST(:moments AS timestamptz[])) AS m"
    )
    with pg_engine.connect() as conn:
        rows = conn.execute(query, {"zone": zone, "moments": moments}).all()
    tz = ZoneInfo(zone)
    wrong = [
        (m, day, month)
        for m, day, month in rows
        if (day, month)
        != (counter_period(tz, "day", m).start, counter_period(tz, "month", m).start)
    ]
    assert len(rows) == len(moments)
    assert wrong == []


EDGES = sorted({m for zone in ZONES for m in near_changes(zone)})


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    zone=st.sampled_from(ZONES),
    events=st.lists(
        st.tuples(st.sampled_from(EDGES), st.integers(1, 1000)), min_size=1, max_size=12
    ),
)
@example(zone="America/Havana", events=[(datetime(2025, 11, 2, 4, 30, tzinfo=UTC), 7)])
@example(zone="America/Santiago", events=[(datetime(2025, 4, 6, 3, 30, tzinfo=UTC), 7)])
def test_counters_equal_a_recomputation_over_local_periods(session_factory, zone, events) -> None:
    tz = ZoneInfo(zone)
    with session_factory() as session:
        set_tenant(session, "A", timezone=zone)
        service = BillingService(session=session, tenant_id="A")
        service.record_usage_batch(
            [
                {"metric": "m", "amount": amount, "at": at, "idempotency_key": str(i)}
                for i, (at, amount) in enumerate(events)
            ]
        )
        want: dict[tuple[str, datetime], int] = {}
        for at, amount in events:
            for window in ("day", "month"):
                key = (window, counter_period(tz, window, at).start)
                want[key] = want.get(key, 0) + amount
        rows = session.scalars(select(UsageCounter))
        assert {(r.granularity, r.period_start): r.total for r in rows} == want
        session.rollback()


# --- zone changes against concurrent writers (PostgreSQL) ----------------------------------

APRIL_NY = datetime(2025, 4, 1, 4, tzinfo=UTC)


def recorded_by(factory, key: str):
    def work() -> str:
        with factory.begin() as session:
            return record(session, amount=2, at=APRIL_NY - TICK, key=key)

    return work


def zone_set_by(factory):
    def work() -> str:
        with factory.begin() as session:
            return set_tenant(session, "A", timezone="America/New_York").timezone

    return work


def begun(factory):
    """A session in an open transaction (the caller commits and closes it)."""
    session = factory()
    session.begin()
    return session


def march_31_in_new_york(amount: int) -> dict:
    """Tenant A's counters holding `amount` on March 31st, 2025 in New York, and its March."""
    return {
        ("A", "tokens", "day", APRIL_NY - DAY): amount,
        ("A", "tokens", "month", datetime(2025, 3, 1, 5, tzinfo=UTC)): amount,
    }


def new_york_counters(factory) -> dict:
    with factory() as session:
        return nonzero(counters(session))


@pytest.mark.postgres
def test_a_zone_change_waits_for_a_writer_of_the_tenant_and_counts_its_event(
    pg_engine, while_held
) -> None:
    factory = make_session_factory(pg_engine)
    writing = begun(factory)
    record(writing, amount=1, at=APRIL_NY - TICK, key="open")  # counted in UTC, not committed
    outcome = while_held(pg_engine, writing, zone_set_by(factory))
    assert outcome == ["America/New_York"]
    assert new_york_counters(factory) == march_31_in_new_york(1)


@pytest.mark.postgres
def test_a_writer_waits_for_a_zone_change_and_counts_in_the_new_zone(pg_engine, while_held) -> None:
    factory = make_session_factory(pg_engine)
    changing = begun(factory)
    set_tenant(changing, "A", timezone="America/New_York")  # holds the zone lock
    outcome = while_held(pg_engine, changing, recorded_by(factory, "w"))
    assert len(outcome) == 1
    assert isinstance(outcome[0], str)
    assert new_york_counters(factory) == march_31_in_new_york(2)


@pytest.mark.postgres
def test_a_consumer_waits_for_a_zone_change_before_it_locks_its_counters(
    pg_engine, while_held
) -> None:
    # A zone change takes the zone lock, then deletes the tenant's counters: a consumer that
    # locked them first, and then waited on the zone lock in the trigger, would deadlock it.
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        subscribe(session, limits=(("tokens", "month", 10),), effective_at=APRIL_NY - 40 * DAY)
        record(session, amount=1, at=APRIL_NY - TICK, key="before")  # the counter rows exist
    changing = begun(factory)
    _lock_zone(changing, "A", shared=False)  # set_tenant's first step

    def consume() -> str:
        with factory.begin() as session:
            status = consume_quota(
                session, tenant_id="A", key="tokens", window="month", amount=3, now=APRIL_NY
            )
            return f"used {status.used}"

    def change_zone() -> None:  # set_tenant's last steps, with the consumer waiting
        changing.execute(Tenant.__table__.insert().values(id="A", name="A", created_at=APRIL_NY))
        changing.execute(update(Tenant).values(timezone="America/New_York"))
        recount(changing, "A")

    outcome = while_held(pg_engine, changing, consume, then=change_zone)
    assert outcome == ["used 3"]  # April in New York: the March event is not in it
    assert new_york_counters(factory) == {
        **march_31_in_new_york(1),
        ("A", "tokens", "day", APRIL_NY): 3,
        ("A", "tokens", "month", APRIL_NY): 3,
    }


# --- the migration -------------------------------------------------------------------------


def test_the_migration_counts_a_zoned_tenants_events_again_and_back(engine) -> None:
    downgrade(engine, "0018_usage_events_partitions")
    try:
        factory = make_session_factory(engine)
        with factory.begin() as session:
            session.add(Tenant(id="A", name="A", timezone="America/New_York", created_at=APRIL_NY))
            # Stored as 0018 stores them (today's ledger needs 0019's function): counted in UTC.
            session.execute(
                UsageEvent.__table__.insert(),
                [
                    {
                        "id": tenant,
                        "tenant_id": tenant,
                        "metric": "tokens",
                        "amount": amount,
                        "at_ts": APRIL_NY - TICK,
                        "idempotency_key": "k",
                        "created_at": APRIL_NY,
                    }
                    for tenant, amount in (("A", 1), ("B", 5))
                ],
            )
        april_utc = datetime(2025, 4, 1, tzinfo=UTC)
        utc = {
            (tenant, "tokens", window, april_utc): amount
            for tenant, amount in (("A", 1), ("B", 5))
            for window in ("day", "month")
        }
        assert new_york_counters(factory) == utc
        upgrade(engine)
        assert new_york_counters(factory) == {
            ("A", "tokens", "day", APRIL_NY - DAY): 1,
            ("A", "tokens", "month", datetime(2025, 3, 1, 5, tzinfo=UTC)): 1,
            **{k: v for k, v in utc.items() if k[0] == "B"},
        }
        downgrade(engine, "0018_usage_events_partitions")
        assert new_york_counters(factory) == utc
    finally:
        upgrade(engine)


@pytest.mark.postgres
def test_a_metric_known_in_the_local_month_is_stored_by_one_statement(pg_engine) -> None:
    """The insert's own metric-limit lookup keys the month as the counters do: the last
    microsecond of March in New York (April in UTC) finds March's row, with no second look."""
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        set_tenant(session, "A", timezone="America/New_York")
        record(session, amount=1, at=APRIL_NY - DAY, key="march")
    with factory.begin() as session:
        sent = statements(session)
        record(session, amount=2, at=APRIL_NY - TICK, key="last-microsecond")
        assert len(sent) == 1
    assert new_york_counters(factory) == march_31_in_new_york(3)
