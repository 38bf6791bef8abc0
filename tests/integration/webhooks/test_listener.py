"""The relay's LISTEN connection (PgListener) on PostgreSQL: it wakes on NOTIFY, and after its
connection is killed it reconnects and LISTENs again."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from tests.processes import wait_until
from webhooks.db import libpq_url
from webhooks.listener import PgListener

pytestmark = pytest.mark.postgres

CHANNEL = "webhooks_listener_test"


class Wakes:
    """Counts the listener's calls."""

    def __init__(self) -> None:
        self.count = 0
        self.mutex = threading.Lock()

    def __call__(self) -> None:
        with self.mutex:
            self.count += 1


@pytest.fixture
def app_name() -> str:
    return f"listener-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def listener(pg_engine: Engine, app_name: str) -> Iterator[tuple[PgListener, Wakes]]:
    url = libpq_url(pg_engine)
    assert url is not None
    wakes = Wakes()
    listener = PgListener(
        f"{url}?application_name={app_name}",
        CHANNEL,
        wakes,
        check_every=0.05,
        reconnect_after=0.05,
    ).start()
    yield listener, wakes
    listener.stop()


def listener_pids(engine: Engine, app_name: str) -> list[int]:
    """The listener's backends, once idle in LISTEN."""
    query = text(
        "SELECT pid FROM pg_stat_activity WHERE application_name = :name "
        "AND state = 'idle' AND query LIKE 'LISTEN%'"
    )
    with engine.connect() as conn:
        return list(conn.scalars(query, {"name": app_name}))


def notify(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


def test_the_listener_wakes_the_relay_on_notify(pg_engine, app_name, listener) -> None:
    pg_listener, wakes = listener
    wait_until(lambda: listener_pids(pg_engine, app_name))
    before = wakes.count  # one wake after LISTEN, for what committed before it
    assert before >= 1
    notify(pg_engine)
    wait_until(lambda: wakes.count > before)


def test_the_listener_reconnects_after_its_connection_is_killed(
    pg_engine, app_name, listener, caplog
) -> None:
    pg_listener, wakes = listener
    wait_until(lambda: listener_pids(pg_engine, app_name))
    [first] = listener_pids(pg_engine, app_name)
    with pg_engine.connect() as conn:
        assert conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    wait_until(lambda: listener_pids(pg_engine, app_name) not in ([], [first]))
    assert "LISTEN webhooks_listener_test failed" in caplog.text
    wait_until(pg_listener.listening.is_set)
    before = wakes.count
    notify(pg_engine)  # heard on the new connection
    wait_until(lambda: wakes.count > before)
