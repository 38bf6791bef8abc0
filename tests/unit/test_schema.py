"""The Alembic migrations and the models describe the same schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from billing.migrate import downgrade, upgrade
from billing.models import Base, Plan, UsageEvent


def all_metadata():
    from billing.migrations import env_metadata

    return env_metadata()


@pytest.mark.postgres
def test_migrations_and_models_agree_on_postgresql(pg_engine: Engine) -> None:
    with pg_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, all_metadata())
    assert diff == []


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
