"""Engines and sessions for the ledger's database (SQLite file or PostgreSQL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from billing.counters import register_sqlite_functions


def normalize_url(url: str) -> str:
    """Point plain `postgresql://` URLs at psycopg 3, the driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """`url` with its password masked, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, *, echo: bool = False, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets foreign keys, WAL, a busy timeout for worker threads and
    the functions the usage counters' triggers call (`billing.counters`).

    No `pool_pre_ping` by default: it costs a round trip per checkout (a quarter of a
    single-event ingest), and SQLAlchemy already invalidates the pool when a connection turns
    out dead, so the next attempt (a Dramatiq retry, a client's retry) gets a fresh one. Pass
    `pool_pre_ping=True` where a first failure after a database restart is not acceptable.
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, echo=echo, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(url, echo=echo, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (jobs return ids from them)."""
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, say when transactions begin (see _sqlite_on_begin):
    # the module's implicit BEGIN before the first write makes savepoints commit on release.
    dbapi_connection.isolation_level = None
    register_sqlite_functions(dbapi_connection)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    if not _is_memory(dbapi_connection):
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    # IMMEDIATE: every transaction takes the write lock up front and waits its turn (busy
    # timeout). A deferred one that reads, then writes after another commit, would fail at once
    # with "database is locked" (busy handlers don't run for snapshot upgrades). The embedded
    # default serializes its transactions this way; PostgreSQL is for concurrency.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _is_memory(dbapi_connection: Any) -> bool:
    rows = dbapi_connection.execute("PRAGMA database_list").fetchall()
    return any(row[1] == "main" and not row[2] for row in rows)
