"""Statements sent straight on psycopg's cursor (PostgreSQL), where SQLAlchemy's work per
statement is a measurable part of a call: the ledger's inserts, the daily aggregation.

SQLAlchemy's work per statement (an execution context, a compile-cache lookup walking the
statement, a result whose columns it reads from the cursor's description each time) was a third
of a single event's client CPU, and up to a tenth of a `latest` aggregation, whose SQL takes a
fraction of a millisecond. Errors are SQLAlchemy's, as from `exec_driver_sql`
(`DBAPIError` and its kinds; a lost connection invalidated). A connection with event listeners
(statement counters, tracing) or echoing its SQL (`SQL_ECHO`) takes `exec_driver_sql`, so that
they see the statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

_DIALECT: Dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]


def rows(session: Session, sql: str, params: dict[str, Any]) -> list[Any]:
    """Run `sql` (psycopg's `%(name)s` parameters) on the session's connection; its rows."""
    connection = session.connection()
    if connection._has_events or connection.engine._has_events or connection._echo:
        return list(connection.exec_driver_sql(sql, params).all())
    try:
        return _cursor(connection).execute(sql, params).fetchall()
    except psycopg.Error as error:
        connection._handle_dbapi_exception(error, sql, params, None, None)  # raises
        raise


def rows_and_commit(session: Session, sql: str, params: dict[str, Any]) -> list[Any]:
    """`rows`, then COMMIT the session's transaction, both sent at once (psycopg's pipeline
    mode): the locks the statement takes are released as soon as the server has run both, not
    when this thread next holds the GIL to send the COMMIT (with other threads running, up to
    milliseconds later). The session's own commit then has nothing left to send: nothing may
    run in its transaction after this."""
    connection = session.connection()
    driver = driver_connection(connection)
    if connection._has_events or connection.engine._has_events or connection._echo:
        found = list(connection.exec_driver_sql(sql, params).all())
        driver.commit()
        return found
    cursor = _cursor(connection)
    try:
        with driver.pipeline():
            cursor.execute(sql, params)
            driver.commit()
        return cursor.fetchall()
    except psycopg.Error as error:
        connection._handle_dbapi_exception(error, sql, params, None, None)  # raises
        raise


def _cursor(connection: Connection) -> psycopg.Cursor[Any]:
    """The cursor `rows` sends on: one per driver connection, kept with it in the pool
    (`info` lives as long as the driver connection). A new cursor per statement was a fifth of
    a short statement's client CPU."""
    info = connection.connection.info
    cursor: psycopg.Cursor[Any] | None = info.get(_CURSOR)
    if cursor is None:
        cursor = info[_CURSOR] = driver_connection(connection).cursor()
    return cursor


_CURSOR = "billing.driver_sql.cursor"


def driver_connection(connection: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under `connection` (for what SQLAlchemy has no API for: COPY)."""
    return cast("psycopg.Connection[Any]", connection.connection.dbapi_connection)


@dataclass(frozen=True, slots=True)
class Compiled:
    """A SQLAlchemy statement compiled once for `rows`: its SQL and the values of its literals
    (`literal("day")`, a LIMIT), to which each call adds its own bound values."""

    sql: str
    literals: dict[str, Any]

    def rows(self, session: Session, values: dict[str, Any], *, commit: bool = False) -> list[Any]:
        """Its rows for `values`; with `commit`, sent with the COMMIT (`rows_and_commit`)."""
        run = rows_and_commit if commit else rows
        return run(session, self.sql, {**self.literals, **values})


def compiled(statement: ClauseElement) -> Compiled:
    """`statement` compiled for psycopg. Its bound parameters must need no conversion by their
    SQLAlchemy type (text, integers, aware datetimes: psycopg adapts them itself)."""
    result = cast(SQLCompiler, statement.compile(dialect=_DIALECT))
    literals = {
        result.bind_names[bind]: bind.effective_value
        for bind in result.binds.values()
        if not bind.required
    }
    return Compiled(result.string, literals)


def read(
    session: Session, statement: Any, compiled: Compiled, values: dict[str, Any]
) -> Sequence[Any]:
    """The rows of `statement`: on PostgreSQL `compiled` (the same statement) on the driver's
    cursor, after a flush (what the caller added is read, as `session.execute` would);
    elsewhere through the session."""
    if session.get_bind().dialect.name != "postgresql":
        return session.execute(statement, values).all()
    session.flush()
    return compiled.rows(session, values)
