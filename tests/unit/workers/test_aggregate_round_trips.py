"""`billing.aggregate_daily` in a fixed number of statements: the tenant's zone read once, the
meter by one Core SELECT, the upsert dropping a former grouping's rows in the same statement on
PostgreSQL, the event; and what it stores unchanged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select, text

from billing import BillingService
from billing.db import make_session_factory
from billing.meters import declare_meter
from billing.models import UsageAggregate
from billing.tenants import set_tenant
from workers.jobs import USAGE_AGGREGATED, aggregate_daily_job

JAN = datetime(2025, 1, 1, tzinfo=UTC)
PAYLOAD = {"tenant_id": "t1", "metric": "tokens", "day_start": "2025-01-01T00:00:00+00:00"}


def test_a_job_runs_a_fixed_sequence_of_statements(
    engine, session_factory, seeded, outbox, statements
) -> None:
    seeded([("t1", 5, JAN + timedelta(hours=1)), ("t1", 7, JAN + timedelta(hours=23))])
    statements.clear()
    assert aggregate_daily_job(session_factory, PAYLOAD) == 12
    on_postgresql = engine.dialect.name == "postgresql"
    if on_postgresql:
        expected = [
            # billing_aggregate_day: the zone lock, the (tenant, metric) lock, the zone and
            # the meter (not the upsert: the event is announced)
            "SELECT day_total, stored_zone,",
            # the upsert, the dropped groups, the event, its deliveries, the notification
            "WITH dropped_groups AS",
        ]
    else:
        expected = [
            "BEGIN IMMEDIATE",  # SQLite's writer lock (billing.db)
            "SELECT tenants.timezone FROM",  # once: the event's day_start comes from it too
            "SELECT meters.aggregation, meters.property,",
            "INSERT INTO usage_aggregates",
            "DELETE FROM usage_aggregates",
            "SELECT webhook_subscriptions.id FROM",
            "INSERT INTO webhook_events",
        ]
    assert statements == expected
    [announced] = outbox(USAGE_AGGREGATED)
    assert (announced["day_start"], announced["total"]) == ("2025-01-01T00:00:00+00:00", 12)


def test_a_meter_that_lost_its_groups_drops_them_for_that_day_only(session_factory, seeded) -> None:
    with session_factory.begin() as session:
        declare_meter(session, key="tokens", group_by=["model"])
    seeded([(tenant, 5, day) for tenant in ("t1", "t2") for day in (JAN, JAN + timedelta(days=1))])
    for tenant in ("t1", "t2"):
        for day in ("2025-01-01", "2025-01-02"):
            payload = {"tenant_id": tenant, "metric": "tokens", "day_start": f"{day}T00:00:00Z"}
            aggregate_daily_job(session_factory, payload)
    with session_factory.begin() as session:
        declare_meter(session, key="tokens")
    assert aggregate_daily_job(session_factory, PAYLOAD) == 5
    with session_factory() as session:
        rows = session.execute(
            select(UsageAggregate.tenant_id, UsageAggregate.period_start, UsageAggregate.group_key)
        ).all()
    grouped = sorted((t, start.day) for t, start, key in rows if key != "")
    assert grouped == [("t1", 2), ("t2", 1), ("t2", 2)]
    assert len([row for row in rows if row[2] == ""]) == 4


@pytest.mark.postgres
def test_a_latest_meters_day_is_one_statement_in_the_zone_of_the_last_run(pg_engine) -> None:
    """`billing_aggregate_day` locks, reads and upserts in one statement when the tenant's zone
    is the one its last run here read; after a zone change the first run reads it and sends
    the upsert cut in the new zone, then it is one statement again."""
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        declare_meter(session, key="gb", aggregation="latest")
        service = BillingService(session=session, tenant_id="t1")
        service.record_usage(
            metric="gb", amount=5, at=JAN + timedelta(hours=20), idempotency_key="a"
        )
        service.record_usage(
            metric="gb", amount=7, at=JAN + timedelta(hours=1), idempotency_key="b"
        )
    sent: list[str] = []

    def aggregate() -> int:
        sent.clear()
        with factory.begin() as session:
            service = BillingService(session=session, tenant_id="t1")
            return service.aggregate_daily(metric="gb", day_start=JAN + timedelta(hours=12))

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append(" ".join(statement.split()[:4]))

    aggregate()  # the zone this process last read for t1 may be another test's
    event.listen(pg_engine, "before_cursor_execute", record)
    try:
        assert (aggregate(), sent) == (5, ["SELECT day_total, stored_zone, meter_aggregation,"])
        with factory.begin() as session:
            set_tenant(session, "t1", timezone="Asia/Kathmandu")  # Jan 1 is 18:15 to 18:15
        assert (aggregate(), sent[1:]) == (7, ["WITH dropped_groups AS (DELETE"])
        assert (aggregate(), len(sent)) == (7, 1)
    finally:
        event.remove(pg_engine, "before_cursor_execute", record)
    with factory() as session:
        rows = session.execute(select(UsageAggregate.period_start, UsageAggregate.total)).all()
    assert rows == [(JAN - timedelta(hours=5, minutes=45), 7)]  # the change dropped the UTC day


@pytest.mark.postgres
def test_a_latest_meters_upsert_is_planned_once_on_postgresql(pg_engine) -> None:
    """psycopg prepares a statement after 5 runs; 5 runs later PostgreSQL keeps a generic plan
    unless it looks dearer than planning each run. A `latest` upsert, whose SQL takes a fraction
    of a millisecond, was planned again at every run while its LIMIT was a parameter (0.3 ms,
    twice its execution): the generic plan's LIMIT counts a tenth of the day's events, and
    sorting them (about 6 per instant: ties) looked dearer than planning."""
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        declare_meter(session, key="gb", aggregation="latest")
        session.execute(
            text(
                "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, "
                "idempotency_key, metadata_json, created_at) "
                "SELECT 'e' || g, 't1', 'gb', g % 1000, :day + (g % 8640) * interval '10 seconds', "
                "'e' || g, '{}', now() FROM generate_series(1, 50000) AS g"
            ),
            {"day": JAN},
        )
    with pg_engine.begin() as connection:
        connection.execute(text("ANALYZE usage_events"))
    with factory() as session:  # one connection: psycopg prepares per connection
        service = BillingService(session=session, tenant_id="t1")
        # announced: the upsert is a statement of its own (not in `billing_aggregate_day`)
        totals = {
            service.aggregate_local_day(metric="gb", day_start=JAN, announce=True).total
            for _ in range(12)
        }
        plans = session.execute(
            text(
                "SELECT generic_plans FROM pg_prepared_statements "
                "WHERE statement LIKE 'WITH dropped_groups%'"
            )
        ).scalar_one()
    assert totals == {919}  # the largest amount at the last instant
    assert plans > 0
