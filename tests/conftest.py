"""Fixtures shared by every test: databases (SQLite and a throwaway PostgreSQL database), Redis.

PostgreSQL and Redis tests skip on a laptop without the servers, and fail in CI (`CI` set), as
dramatiq's own suite does. The session's PostgreSQL database, those a test makes (`pg_database`)
and every test's Redis namespace (`redis_namespace`) carry the session's mark (`RUN`); after the
last test the session fails if either server still holds anything with that mark (other sessions
may share the servers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from billing.db import make_engine, make_session_factory
from billing.migrate import upgrade

PG_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVICES_REQUIRED = bool(os.environ.get("CI")) or bool(os.environ.get("BILLING_REQUIRE_SERVICES"))

_ENV_VARS_THAT_LEAK = ("DATABASE_URL", "REDIS_URL", "BROKER_URL")

RUN = uuid.uuid4().hex[:10]
"""This test session's mark, in the names of the databases and Redis namespaces it makes."""
_SERVERS_USED: set[str] = set()

MUTATE_WITH_POSTGRES = "MUTATE_WITH_POSTGRES"
"""Set by `scripts/mutate --postgres`: the mutation run includes the `postgres` tests too."""


def pytest_configure(config: pytest.Config) -> None:
    """Under `scripts/mutate --postgres`, drop `not postgres` from the run's marker filter.

    mutmut reads its pytest arguments from `pyproject.toml` alone; its children inherit the
    environment, so the variable chooses the filter for the stats run and every mutant alike.
    """
    if os.environ.get(MUTATE_WITH_POSTGRES):
        config.option.markexpr = "not redis and not slow"


def pytest_sessionstart(session: pytest.Session) -> None:
    """A new mark per session: mutmut runs one session per mutant, in processes forked from one
    that imported this module, and two at once must not share a database name."""
    global RUN
    RUN = uuid.uuid4().hex[:10]


def service_missing(what: str, error: BaseException) -> None:
    """Fail in CI, skip elsewhere, when a server a test needs is not running."""
    if SERVICES_REQUIRED:
        raise RuntimeError(f"{what} is required in CI but unreachable: {error}") from error
    pytest.skip(f"{what} unreachable: {error}")


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the last test: no database and no Redis key of this session remains."""
    yield
    left = []
    if "postgresql" in _SERVERS_USED:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=None)
        with admin.connect() as conn:
            query = text("SELECT datname FROM pg_database WHERE strpos(datname, :run) > 0")
            left += [f"database {name}" for name in conn.scalars(query, {"run": RUN})]
        admin.dispose()
    if "redis" in _SERVERS_USED:
        import redis

        with redis.Redis.from_url(REDIS_TEST_URL) as client:
            keys = list(client.scan_iter(match=f"test-{RUN}-*", count=1000))
            left += [f"Redis key {key!r}" for key in keys[:20]]
            if keys:
                client.delete(*keys)
    assert not left, f"the tests left behind: {', '.join(left)}"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own DATABASE_URL or REDIS_URL out of the tests."""
    for name in _ENV_VARS_THAT_LEAK:
        monkeypatch.delenv(name, raising=False)


# --- SQLite ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once to head; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "template.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture
def sqlite_engine(sqlite_template: Path, tmp_path: Path) -> Iterator[Engine]:
    path = tmp_path / "billing.sqlite3"
    shutil.copy(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


# --- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """The PostgreSQL server's `postgres` database, to create and drop this session's own."""
    try:
        admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=None)
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as error:  # any driver error means: no server here
        service_missing("PostgreSQL", error)
    _SERVERS_USED.add("postgresql")
    yield admin
    admin.dispose()


@contextlib.contextmanager
def _database(admin: Engine, name: str) -> Iterator[str]:
    """A new empty database `name` (it carries the session's mark), dropped on exit; its URL."""
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """A PostgreSQL database of its own for this test session, dropped at the end."""
    with _database(pg_admin, f"billing_test_{RUN}") as url:
        yield url


@pytest.fixture
def pg_database(pg_admin: Engine) -> Iterator[Callable[[str], str]]:
    """`pg_database(label)`: the URL of a new empty PostgreSQL database of the test's own (not
    migrated), dropped after the test. Its name is new too: what a process keeps per database
    URL (`billing.aggregation`'s zone guesses) is not another test's."""
    with contextlib.ExitStack() as databases:
        yield lambda label: databases.enter_context(
            _database(pg_admin, f"billing_test_{RUN}_{label}_{uuid.uuid4().hex[:8]}")
        )


@pytest.fixture(scope="session")
def pg_migrated_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=20, max_overflow=20)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(pg_migrated_engine: Engine) -> Iterator[Engine]:
    """The migrated PostgreSQL database, emptied after each test."""
    yield pg_migrated_engine
    truncate_all(pg_migrated_engine)


def _wait_for_lock_waiters(engine: Engine, count: int, timeout: float = 20.0) -> bool:
    """True once `count` backends of this database wait on a lock (polled, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one() >= count:
                return True
        time.sleep(0.01)
    return False


@pytest.fixture
def wait_for_lock_waiters() -> Callable[..., bool]:
    """`wait_for_lock_waiters(engine, n)`: True once n sessions of `engine` wait on a lock."""
    return _wait_for_lock_waiters


def _race(count: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` in `count` threads released at the same instant; results or exceptions
    (each thread must finish within a minute)."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a racer did not finish"
    return results


@pytest.fixture
def race() -> Callable[..., list[object]]:
    """`race(count, work)`: what `work(i)` returned or raised in each of `count` threads that
    a barrier released at once, in index order."""
    return _race


def _while_held(
    engine: Engine,
    held: Session,
    work: Callable[[], object],
    then: Callable[[], object] | None = None,
) -> list[object]:
    """Run `work` in a thread while the open transaction `held` blocks it on a lock; once it
    waits, run `then`, commit `held`, and return what `work` returned or raised (one item)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert _wait_for_lock_waiters(engine, 1), "nobody waited for a lock"
        assert outcome == []
        if then is not None:
            then()
        held.commit()
    finally:
        held.close()
        thread.join(timeout=30)
    return outcome


@pytest.fixture
def while_held() -> Callable[..., list[object]]:
    """`while_held(engine, held, work, then=None)`: what `work` returned or raised in a thread
    that waited for the open transaction `held` (committed after `then`)."""
    return _while_held


@pytest.fixture
def outbox_listener(pg_engine: Engine) -> Iterator[Any]:
    """A psycopg connection of its own that LISTENs on the relays' channel in the test database
    (`webhooks.outbox.NOTIFY_CHANNEL`); its `notifies(...)` reads what arrived."""
    import psycopg

    from webhooks.outbox import NOTIFY_CHANNEL

    url = pg_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        yield listener


def truncate_all(engine: Engine) -> None:
    with engine.begin() as conn:
        tables = conn.execute(
            text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version'"
            )
        ).scalars()
        names = ", ".join(f'"{t}"' for t in tables)
        if names:
            conn.execute(text(f"TRUNCATE {names} CASCADE"))


# --- Either database ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Runs a test once on SQLite and once on PostgreSQL."""
    fixture = "sqlite_engine" if request.param == "sqlite" else "pg_engine"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in an open transaction, rolled back at the end of the test."""
    with session_factory() as session:
        yield session
        session.rollback()


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement sent to the database, its first words, as it is sent."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append(" ".join(statement.split()[:3]))

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


# --- Redis ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis server's URL (tests namespace their keys so they can share it)."""
    import redis

    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
    except Exception as error:
        service_missing("Redis", error)
    finally:
        client.close()
    _SERVERS_USED.add("redis")
    return REDIS_TEST_URL


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own on the real Redis; its keys are deleted afterwards."""
    import redis

    name = f"test-{RUN}-{uuid.uuid4().hex[:8]}"
    yield name
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{name}*", count=1000))
        if keys:
            client.delete(*keys)
