"""`consume_quota` reads what it checks under the counter rows' lock, on SQLite as on
PostgreSQL: the first statement that touches `usage_counters` is the locking upsert that returns
the totals, and a group's usage is summed only after it (a read taken before the lock could be
stale by the time the usage is written). The PostgreSQL race itself is
`test_a_second_consume_waits_for_the_first_s_lock_and_reads_its_total`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from billing.quotas import consume_quota

from .test_quota_counters import NOW, record, subscribe


@contextmanager
def statements(session: Session) -> Iterator[list[str]]:
    """The SQL the session's engine runs inside the block, upper-cased, in order."""
    seen: list[str] = []
    engine = session.get_bind()

    def capture(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        seen.append(" ".join(sql.upper().split()))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", capture)


def lock_index(sql: list[str]) -> int:
    locks = [
        i
        for i, s in enumerate(sql)
        if s.startswith("INSERT INTO USAGE_COUNTERS") and "ON CONFLICT" in s and "RETURNING" in s
    ]
    assert locks, "consume_quota did not lock the counters"
    return locks[0]


def test_the_total_checked_is_the_one_the_lock_returns(session) -> None:
    subscribe(session, limits=(("tokens", "day", 15),))
    record(session, amount=10)
    with statements(session) as sql:
        status = consume_quota(
            session, tenant_id="A", key="tokens", window="day", amount=6, now=NOW
        )
    assert status is not None
    assert (status.allowed, status.used) == (False, 10)
    lock = lock_index(sql)
    assert [s for s in sql[:lock] if "USAGE_COUNTERS" in s or "USAGE_EVENTS" in s] == []


def test_a_group_s_usage_is_summed_after_the_lock(session) -> None:
    subscribe(session, limits=(("tokens", "day", 15),))
    group = {"model": "gpt-4"}
    with statements(session) as sql:
        status = consume_quota(
            session, tenant_id="A", key="tokens", window="day", amount=6, now=NOW, group=group
        )
    assert status is not None
    assert (status.allowed, status.used) == (True, 6)
    lock = lock_index(sql)
    sums = [i for i, s in enumerate(sql) if s.startswith("SELECT") and "FROM USAGE_EVENTS" in s]
    assert sums, "the group's usage was not read"
    assert min(sums) > lock
