"""A day's aggregate is cut in the zone its tenant has in the database it runs on. On PostgreSQL
the zone a tenant's last run in this process read is only a guess (`billing.aggregation`'s
`_ZONES`), kept per database and only once it parsed: a stored zone this machine cannot read is
refused by name, and the tenant's next run, here or in another database, is not refused too."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService, InvalidTimezoneError
from billing.aggregation import DayTotal, aggregate_local_day
from billing.db import make_engine, make_session_factory
from billing.meters import declare_meter
from billing.migrate import upgrade
from billing.models import Tenant, UsageAggregate
from billing.tenants import set_tenant

JAN = datetime(2025, 1, 1, tzinfo=UTC)
#: Kathmandu's January 1st runs from 18:15 UTC on December 31st to 18:15 UTC on January 1st.
KATHMANDU_JAN_1 = JAN - timedelta(hours=5, minutes=45)
UNREADABLE = "time zone 'Mars/Olympus' is not in this machine's zone database"


@pytest.fixture
def other_pg_engine(pg_database) -> Iterator[Engine]:
    """A second migrated PostgreSQL database: the same tenant ids, rows of its own."""
    engine = make_engine(pg_database("other"))
    upgrade(engine)
    yield engine
    engine.dispose()


def seed(factory: sessionmaker[Session], zone: str | None) -> None:
    """t1's tokens at 01:00 (5) and 20:00 (7) UTC on January 1st, and its row in `zone` (none
    for None), stored unchecked (as by a machine whose zone database has it)."""
    with factory.begin() as session:
        service = BillingService(session=session, tenant_id="t1")
        for key, amount, hour in (("a", 5, 1), ("b", 7, 20)):
            at = JAN + timedelta(hours=hour)
            service.record_usage(metric="tokens", amount=amount, at=at, idempotency_key=key)
    if zone is not None:
        with factory.begin() as session:
            session.add(Tenant(id="t1", name="t1", timezone=zone, created_at=JAN))


def aggregate(factory: sessionmaker[Session]) -> DayTotal:
    """t1's tokens on its local day containing noon UTC of January 1st, in a job's transaction."""
    with factory.begin() as session:
        return aggregate_local_day(session, "t1", "tokens", JAN + timedelta(hours=12))


def stored(factory: sessionmaker[Session]) -> list[tuple[datetime, int]]:
    with factory() as session:
        rows = session.execute(select(UsageAggregate.period_start, UsageAggregate.total))
        return [(start, total) for start, total in rows]


@pytest.mark.postgres
def test_a_zone_unreadable_in_one_database_is_not_guessed_for_its_tenant_id_in_another(
    pg_engine, other_pg_engine
) -> None:
    on_mars = make_session_factory(pg_engine)
    in_kathmandu = make_session_factory(other_pg_engine)
    seed(on_mars, "Mars/Olympus")
    seed(in_kathmandu, "Asia/Kathmandu")
    with pytest.raises(InvalidTimezoneError, match=UNREADABLE):
        aggregate(on_mars)
    day = aggregate(in_kathmandu)
    assert (day.total, day.day_start.isoformat()) == (5, "2025-01-01T00:00:00+05:45")
    assert stored(in_kathmandu) == [(KATHMANDU_JAN_1, 5)]
    assert stored(on_mars) == []


def test_a_zone_refused_by_name_is_not_guessed_once_the_tenant_has_a_readable_one(
    session_factory,
) -> None:
    seed(session_factory, "Mars/Olympus")
    with pytest.raises(InvalidTimezoneError, match=UNREADABLE):
        aggregate(session_factory)
    with session_factory.begin() as session:
        set_tenant(session, "t1", timezone="Asia/Kathmandu")
    day = aggregate(session_factory)
    assert (day.total, day.day_start.isoformat()) == (5, "2025-01-01T00:00:00+05:45")
    assert stored(session_factory) == [(KATHMANDU_JAN_1, 5)]


@pytest.mark.postgres
def test_a_zone_read_in_one_database_is_not_the_guess_for_its_tenant_id_in_another(
    pg_engine, other_pg_engine
) -> None:
    """A `latest` day is one statement when the tenant's zone is the guess: t1 read in Kathmandu
    in one database leaves the guess for the other's t1 (no row: UTC) unset, so one statement."""
    in_kathmandu = make_session_factory(pg_engine)
    in_utc = make_session_factory(other_pg_engine)
    for factory, zone in ((in_kathmandu, "Asia/Kathmandu"), (in_utc, None)):
        with factory.begin() as session:
            declare_meter(session, key="tokens", aggregation="latest")
        seed(factory, zone)
    assert aggregate(in_kathmandu).total == 5
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append(statement)

    event.listen(other_pg_engine, "before_cursor_execute", record)
    try:
        day = aggregate(in_utc)
    finally:
        event.remove(other_pg_engine, "before_cursor_execute", record)
    assert (day.total, day.day_start.isoformat()) == (7, "2025-01-01T00:00:00+00:00")
    [statement] = sent  # billing_aggregate_day, its upsert included
    assert "FROM billing_aggregate_day(" in statement
