"""The monthly invoice job on PostgreSQL commits a new invoice with its numbering statement
(`billing.driver_sql.rows_and_commit`): the sequence's row, which every other finalizer waits
for, is free, and the invoice numbered and visible to others, before the job's own commit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from billing.lifecycle import InvoicePolicy
from workers.jobs import generate_monthly_invoice_job

from .conftest import JAN

pytestmark = pytest.mark.postgres

PAYLOAD = {
    "tenant_id": "t1",
    "period_start": "2025-01-01T00:00:00+00:00",
    "period_end": "2025-02-01T00:00:00+00:00",
    "currency": "usd",
}


@pytest.fixture
def engine(pg_engine: Engine) -> Engine:
    """PostgreSQL only: SQLite has a single writer and no pipeline to send the COMMIT in."""
    return pg_engine


@pytest.fixture
def at_commit(
    engine: Engine, session_factory: sessionmaker[Session]
) -> Iterator[list[tuple[object, list[tuple[str, str]]]]]:
    """What another connection sees when a job's session commits: the invoice sequence's row
    taken without waiting (or `locked`), and the tenant's invoices (status, number)."""
    seen: list[tuple[object, list[tuple[str, str]]]] = []

    def look(session: Session) -> None:
        with engine.connect() as other:
            try:
                row = other.execute(
                    text(
                        "SELECT last_value FROM number_sequences WHERE name = 'invoice' "
                        "FOR UPDATE NOWAIT"
                    )
                ).scalar_one_or_none()
            except OperationalError:  # LockNotAvailable: held by the job's transaction
                other.rollback()
                row = "locked"
            invoices = other.execute(
                text("SELECT status, number FROM invoices WHERE tenant_id = 't1'")
            ).all()
        seen.append((row, [(status, number) for status, number in invoices]))

    event.listen(session_factory, "before_commit", look)
    yield seen
    event.remove(session_factory, "before_commit", look)


def test_a_new_invoice_is_committed_with_its_number_before_the_job_commits(
    session_factory, seeded: Callable[..., None], at_commit
) -> None:
    seeded([("t1", 250, JAN + timedelta(days=3))], plan_for=("t1",))
    at_commit.clear()
    generate_monthly_invoice_job(session_factory, PAYLOAD)
    # the sequence's first number made its row
    assert at_commit == [(1, [("open", "INV-000001")])]


def test_a_draft_of_a_grace_period_commits_with_the_job(
    session_factory, seeded: Callable[..., None], at_commit
) -> None:
    seeded([("t1", 250, JAN + timedelta(days=3))], plan_for=("t1",))
    at_commit.clear()
    policy = InvoicePolicy(grace_period=timedelta(days=3))
    generate_monthly_invoice_job(session_factory, PAYLOAD, policy=policy)
    assert at_commit == [(None, [])]  # not numbered, not visible before the commit
