"""`usage_events` partitioned by month on PostgreSQL: partitions made ahead by the scheduler, an
event of a month without one kept in the default partition until its month is made, idempotency
whole across partitions (single events, unnest and COPY-stage batches, senders at once), and
the migration converting a table that holds events."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select, text

from billing import BillingService, IdempotencyConflictError
from billing.db import make_session_factory
from billing.migrate import downgrade, upgrade
from billing.models import UsageEvent
from billing.partitions import (
    DEFAULT_PARTITION,
    ensure_partitions,
    is_partitioned,
    partition_name,
)
from workers.scheduler import BillingScheduler
from workers.settings import WorkerSettings

pytestmark = pytest.mark.postgres

OLD = datetime(2019, 5, 20, 12, tzinfo=UTC)  # a month no partition is made for ahead
LATER = datetime(2019, 8, 2, tzinfo=UTC)


def where_stored(engine: Engine) -> dict[str, int]:
    """Rows per partition (by the table that physically holds them)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT tableoid::regclass::text, count(*) FROM usage_events GROUP BY 1")
        )
        return dict(rows.all())


def partitions(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'usage_events'::regclass"
                )
            ).scalars()
        )


def counters(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT tenant_id, metric, granularity, period_start, total FROM usage_counters "
                "ORDER BY 1, 2, 3, 4"
            )
        ).all()


def record(
    engine: Engine, *events: tuple[str, int, datetime], tenant: str = "acme", now=None
) -> list:
    clock = {} if now is None else {"now": lambda: now}
    with make_session_factory(engine).begin() as session:
        service = BillingService(session=session, tenant_id=tenant, **clock)
        batch = [
            {"metric": "tokens", "amount": amount, "at": at, "idempotency_key": key}
            for key, amount, at in events
        ]
        return service.ingest(batch)


def test_the_migration_partitions_usage_events_by_month_ahead_and_by_default(pg_engine) -> None:
    with pg_engine.connect() as conn:
        assert is_partitioned(conn)
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    assert partition_name(month) in partitions(pg_engine)
    assert DEFAULT_PARTITION in partitions(pg_engine)
    assert len(partitions(pg_engine) - {DEFAULT_PARTITION}) >= 4  # this month and 3 ahead


def test_an_event_of_a_month_without_a_partition_waits_in_the_default_one(pg_engine) -> None:
    [first] = record(pg_engine, ("k-old", 5, OLD))
    assert where_stored(pg_engine) == {DEFAULT_PARTITION: 1}
    before = counters(pg_engine)
    with pg_engine.begin() as conn:
        created = ensure_partitions(conn, now=LATER)
    assert created[0] == "usage_events_p2019_05"  # the default's month, then LATER's and ahead
    assert created[1:] == [f"usage_events_p2019_{m:02d}" for m in (8, 9, 10, 11)]
    assert where_stored(pg_engine) == {"usage_events_p2019_05": 1}
    assert counters(pg_engine) == before  # moved, not counted twice nor uncounted
    [again] = record(pg_engine, ("k-old", 5, OLD))
    assert (again.id, again.duplicate) == (first.id, True)
    with pg_engine.begin() as conn:
        assert ensure_partitions(conn, now=LATER) == []  # twice: nothing more


@pytest.mark.parametrize("size", [1, 10, 100], ids=["single", "unnest", "copy-stage"])
def test_a_key_reused_in_another_month_is_a_conflict_whatever_the_path(pg_engine, size) -> None:
    jan = [(f"k{n}", n, datetime(2026, 1, 5, tzinfo=UTC)) for n in range(size)]
    stored = record(pg_engine, *jan)
    mar = [(key, amount, datetime(2026, 3, 5, tzinfo=UTC)) for key, amount, _ in jan]
    with pytest.raises(IdempotencyConflictError) as conflict:
        record(pg_engine, *mar)
    assert conflict.value.existing_id == stored[0].id
    again = record(pg_engine, *jan)
    assert [(r.id, r.duplicate) for r in again] == [(r.id, True) for r in stored]
    with pg_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(UsageEvent)).scalar_one() == size
        assert conn.execute(text("SELECT count(*) FROM usage_event_keys")).scalar_one() == size


def test_senders_of_one_key_in_different_months_at_once_store_one_event(pg_engine, race) -> None:
    def send(index: int) -> str:
        try:
            record(pg_engine, ("same", 1, datetime(2026, index + 1, 3, tzinfo=UTC)))
        except IdempotencyConflictError:
            return "conflict"
        return "stored"

    assert sorted(race(6, send)) == ["conflict"] * 5 + ["stored"]
    assert sum(where_stored(pg_engine).values()) == 1


def test_the_scheduler_makes_the_months_ahead(pg_engine) -> None:
    settings = WorkerSettings(partitions_ahead=2)
    scheduler = BillingScheduler(
        settings,
        make_session_factory(pg_engine),
        lock=None,  # type: ignore[arg-type]  # run_partitions takes no fire lock
        send_aggregate=lambda **_: None,
        send_invoice=lambda **_: None,
        now=lambda: datetime(2031, 11, 15, tzinfo=UTC),
    )
    assert scheduler.run_partitions() == [
        "usage_events_p2031_11",
        "usage_events_p2031_12",
        "usage_events_p2032_01",
    ]
    assert scheduler.run_partitions() == []
    last_minute = datetime(2032, 1, 31, 23, 59, tzinfo=UTC)
    record(pg_engine, ("k", 1, last_minute), now=last_minute)
    assert where_stored(pg_engine) == {"usage_events_p2032_01": 1}


def test_two_processes_making_partitions_at_once_make_each_once(pg_engine, race) -> None:
    def make(_: int) -> list[str]:
        with pg_engine.begin() as conn:
            return ensure_partitions(conn, now=datetime(2033, 1, 1, tzinfo=UTC))

    made = race(2, make)
    assert sorted(made, key=len) == [[], [f"usage_events_p2033_{m:02d}" for m in (1, 2, 3, 4)]]


def insert_as_the_previous_release(engine: Engine, tenant: str, key: str, at: datetime) -> str:
    """An event stored as the previous release's ledger did: a plain row (its triggers count it)."""
    event_id = f"00000000-0000-0000-0000-{abs(hash((tenant, key))) % 10**12:012d}"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, "
                "idempotency_key, metadata_json, created_at) "
                "VALUES (:id, :tenant, 'tokens', 3, :at, :key, NULL, now())"
            ),
            {"id": event_id, "tenant": tenant, "key": key, "at": at},
        )
    return event_id


def test_the_migration_keeps_the_events_counters_and_keys_of_the_previous_release(
    pg_engine,
) -> None:
    downgrade(pg_engine, "0017_adjustment_lines")
    try:
        with pg_engine.connect() as conn:
            assert not is_partitioned(conn)
        months = [datetime(2018, 2, 10, tzinfo=UTC), datetime(2018, 4, 30, 23, tzinfo=UTC)]
        old = [("a", months[0]), ("b", months[0]), ("c", months[1])]
        ids = [insert_as_the_previous_release(pg_engine, "acme", k, at) for k, at in old]
        insert_as_the_previous_release(pg_engine, "globex", "a", months[1])
        before = counters(pg_engine)
        assert len(before) == 6  # (acme: 2 days, 2 months) and (globex: 1 day, 1 month)
    finally:
        upgrade(pg_engine)  # whatever happened, the next tests get the head schema
    assert where_stored(pg_engine) == {"usage_events_p2018_02": 2, "usage_events_p2018_04": 2}
    assert {"usage_events_p2018_03", DEFAULT_PARTITION} <= partitions(pg_engine)
    assert counters(pg_engine) == before
    again = record(pg_engine, *[(key, 3, at) for key, at in old])
    assert [(r.id, r.duplicate) for r in again] == [(i, True) for i in ids]
    with pytest.raises(IdempotencyConflictError):
        record(pg_engine, ("a", 3, months[1]))
    downgrade(pg_engine, "0017_adjustment_lines")  # and back: the events stay
    try:
        with pg_engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(UsageEvent)).scalar_one() == 4
            assert counters(pg_engine) == before
    finally:
        upgrade(pg_engine)
