"""billing.driver_sql: statements on psycopg's cursor, one cursor per driver connection."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.exc import DBAPIError, ProgrammingError

from billing import driver_sql
from billing.db import make_engine, make_session_factory

pytestmark = pytest.mark.postgres


@pytest.fixture
def factory(pg_engine):
    """Sessions on an engine of their own: its pool's connections have no cursor yet."""
    engine = make_engine(pg_engine.url.render_as_string(hide_password=False))
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def senders(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[object]]:
    """By statement: the cursors that ran it, in order."""
    sent: dict[str, list[object]] = {}
    execute = psycopg.Cursor.execute

    def recorded(self, query, *args, **kwargs):
        sent.setdefault(str(query), []).append(self)
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", recorded)
    return sent


def test_a_connection_s_statements_share_one_cursor_across_transactions(factory, senders) -> None:
    for n in range(3):
        with factory.begin() as session:
            assert driver_sql.rows(session, "SELECT %(n)s::int", {"n": n}) == [(n,)]
            assert driver_sql.rows(session, "SELECT %(n)s::int + 1", {"n": n}) == [(n + 1,)]
    used = senders["SELECT %(n)s::int"] + senders["SELECT %(n)s::int + 1"]
    assert len(used) == 6
    assert len(set(map(id, used))) == 1  # the pool hands the same connection back


def test_after_a_failed_statement_the_cursor_runs_the_next(factory) -> None:
    with factory() as session:
        with pytest.raises(ProgrammingError):
            driver_sql.rows(session, "SELECT no_such_column", {})
        session.rollback()
        assert driver_sql.rows(session, "SELECT %(n)s::int", {"n": 7}) == [(7,)]


def test_a_lost_connection_s_cursor_is_not_used_again(factory, senders) -> None:
    backend = "SELECT pg_backend_pid()"
    with factory() as session:
        [(lost,)] = driver_sql.rows(session, backend, {})
        with pytest.raises(DBAPIError) as raised:
            driver_sql.rows(session, "SELECT pg_terminate_backend(pg_backend_pid())", {})
        assert raised.value.connection_invalidated
    with factory() as session:
        [(pid,)] = driver_sql.rows(session, backend, {})
    assert pid != lost
    first, second = senders[backend]
    assert first is not second
