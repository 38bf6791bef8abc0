"""Engine set-up: SQLite transactions and savepoints behave as on PostgreSQL."""

from __future__ import annotations

from sqlalchemy import func, select

from billing.db import make_engine, make_session_factory, normalize_url
from billing.models import Plan


def count_plans(session) -> int:
    return session.execute(select(func.count()).select_from(Plan)).scalar_one()


def test_a_rolled_back_savepoint_undoes_only_its_own_writes(session) -> None:
    session.add(Plan(key="outer", name="kept"))
    session.flush()
    with session.begin_nested() as nested:
        session.add(Plan(key="inner", name="undone"))
        session.flush()
        nested.rollback()
    assert count_plans(session) == 1


def test_a_released_savepoint_stays_inside_the_outer_transaction(session_factory) -> None:
    with session_factory() as session:
        with session.begin_nested():
            session.add(Plan(key="inner", name="released"))
        session.rollback()
    with session_factory() as session:
        assert count_plans(session) == 0


def test_plain_postgresql_urls_use_psycopg_3() -> None:
    assert normalize_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_the_sqlite_file_is_in_wal_mode(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    with make_session_factory(engine)() as session:
        assert session.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
