"""Gapless numbers (`INV-000042`, `CN-000007`) taken inside the caller's transaction.

Each sequence is one row of `number_sequences`. `UPDATE … SET last_value = last_value + 1
RETURNING last_value` locks that row until the transaction ends, so on PostgreSQL concurrent
finalizers take numbers one after another in commit order, and a transaction that rolls back
gives its number back: no gap, no duplicate. (SQLite has a single writer anyway.)
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.models import NumberSequence

INVOICE_SEQUENCE = "invoice"
CREDIT_NOTE_SEQUENCE = "credit_note"
WIDTH = 6


def next_number(session: Session, sequence: str, prefix: str) -> str:
    """Take the next number of `sequence`, formatted as `prefix` and a zero-padded integer."""
    value = _increment(session, sequence)
    if value is None:
        insert = (
            postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        )
        session.execute(
            insert(NumberSequence)
            .values(name=sequence, last_value=0)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        value = _increment(session, sequence)
        assert value is not None, "the sequence row exists now"
    return f"{prefix}{value:0{WIDTH}d}"


def _increment(session: Session, sequence: str) -> int | None:
    result = session.execute(
        update(NumberSequence)
        .where(NumberSequence.name == sequence)
        .values(last_value=NumberSequence.last_value + 1)
        .returning(NumberSequence.last_value)
    ).scalar_one_or_none()
    return None if result is None else int(result)


def last_number(session: Session, sequence: str) -> int:
    """The last value issued from `sequence` (0 before the first)."""
    value = session.execute(
        select(NumberSequence.last_value).where(NumberSequence.name == sequence)
    ).scalar_one_or_none()
    return int(value or 0)
