"""The Alembic migrations and the models describe the same schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from billing.migrate import downgrade, upgrade
from billing.migrations import env_metadata, include_object
from billing.models import Base, Plan, UsageEvent


@pytest.mark.postgres
def test_migrations_and_models_agree_on_postgresql(pg_engine: Engine) -> None:
    opts = {"compare_type": True, "include_object": include_object("postgresql")}
    with pg_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts=opts), env_metadata())
    assert diff == []


@pytest.mark.postgres
def test_the_comparison_sees_a_partitioned_usage_events_unlike_the_models(
    pg_engine: Engine,
) -> None:
    """The filter leaves out the partitions and the SQLite-only key, nothing else."""
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE usage_event_keys DROP COLUMN amount")
    try:
        opts = {"compare_type": True, "include_object": include_object("postgresql")}
        with pg_engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts=opts), env_metadata())
        [(kind, _, table, column)] = diff
        assert (kind, table, column.name) == ("add_column", "usage_event_keys", "amount")
    finally:
        with pg_engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE usage_event_keys ADD COLUMN amount BIGINT")
            conn.exec_driver_sql("ALTER TABLE usage_event_keys ALTER COLUMN amount SET NOT NULL")


def test_migrations_create_the_billing_tables(sqlite_engine: Engine) -> None:
    names = set(inspect(sqlite_engine).get_table_names())
    assert set(Base.metadata.tables) <= names


@pytest.mark.postgres
def test_migrations_downgrade_to_nothing_and_back(pg_engine: Engine) -> None:
    downgrade(pg_engine, "base")
    assert set(inspect(pg_engine).get_table_names()) <= {"alembic_version"}
    upgrade(pg_engine)
    assert set(Base.metadata.tables) <= set(inspect(pg_engine).get_table_names())


def test_datetimes_read_back_aware_utc(session) -> None:
    at = datetime(2025, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    session.add(UsageEvent(tenant_id="t", metric="m", amount=1, at_ts=at, idempotency_key="k"))
    session.flush()
    session.expire_all()
    event = session.query(UsageEvent).one()
    assert event.at_ts == datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
    assert event.at_ts.tzinfo is UTC
    assert event.created_at.tzinfo is UTC
    assert len(event.id) == 36


def test_naive_datetimes_are_refused_by_the_column_type(session) -> None:
    session.add(
        UsageEvent(
            tenant_id="t", metric="m", amount=1, at_ts=datetime(2025, 1, 1), idempotency_key="k"
        )
    )
    with pytest.raises(Exception, match="naive"):
        session.flush()


def test_plan_keys_are_unique(session) -> None:
    from sqlalchemy.exc import IntegrityError

    session.add_all([Plan(key="pro", name="Pro"), Plan(key="pro", name="Pro again")])
    with pytest.raises(IntegrityError):
        session.flush()
