"""Gapless numbers (`INV-000042`, `CN-000007`) taken inside the caller's transaction.

Each sequence is one row of `number_sequences`. `UPDATE … SET last_value = last_value + 1
RETURNING last_value` locks that row until the transaction ends, so on PostgreSQL concurrent
finalizers take numbers one after another in commit order, and a transaction that rolls back
gives its number back: no gap, no duplicate. (SQLite has a single writer anyway.)

Every other finalizer waits on that row from the moment a number is taken to the COMMIT, so
an invoice takes its number last (`number_invoice`): one statement finalizes and numbers the
invoice and numbers its `billing.invoice.finalized` event, already written, and only the
COMMIT follows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing.models import Invoice, NumberSequence
from webhooks.models import WebhookEvent
from webhooks.sqltypes import UTCDateTime

INVOICE_SEQUENCE = "invoice"
CREDIT_NOTE_SEQUENCE = "credit_note"
WIDTH = 6


def next_number(session: Session, sequence: str, prefix: str) -> str:
    """Take the next number of `sequence`, formatted as `prefix` and a zero-padded integer."""
    value = _increment(session, sequence)
    if value is None:
        _create(session, sequence)
        value = _increment(session, sequence)
        assert value is not None, "the sequence row exists now"
    return f"{prefix}{value:0{WIDTH}d}"


def number_invoice(
    session: Session,
    invoice_id: str,
    event_id: str,
    prefix: str,
    *,
    finalized_at: datetime,
    sequence: str = INVOICE_SEQUENCE,
) -> str:
    """Finalize the invoice: take the next number of `sequence` for it and write it, the status
    `open` and `finalized_at` into the invoice's row, and the number into its stored event
    `event_id`; return the number.

    Run it last before the commit: the sequence's row stays locked until then. On PostgreSQL it
    is one statement (increment, invoice, event); on SQLite three.
    """
    finalized = {"status": "open", "finalized_at": finalized_at}
    if session.get_bind().dialect.name != "postgresql":
        number = next_number(session, sequence, prefix)
        invoice = update(Invoice).where(Invoice.id == invoice_id)
        session.execute(invoice.values(number=number, **finalized))
        patched = func.json_set(WebhookEvent.payload, "$.number", number)
        event = update(WebhookEvent).where(WebhookEvent.id == event_id)
        session.execute(event.values(payload=patched))
        return number
    names = {
        "sequence": sequence,
        "prefix": prefix,
        "invoice_id": invoice_id,
        "event_id": event_id,
        **finalized,
    }
    taken = session.execute(_NUMBER_INVOICE, names).scalar_one_or_none()
    if taken is None:  # the sequence's first number: make its row, then take it
        _create(session, sequence)
        taken = session.execute(_NUMBER_INVOICE, names).scalar_one()
    return str(taken)


# Data-modifying CTEs all run, whether the final SELECT reads them or not.
_NUMBER_INVOICE = text(
    f"""
    WITH taken AS (
        UPDATE number_sequences SET last_value = last_value + 1 WHERE name = :sequence
        RETURNING CAST(:prefix AS text) || CASE WHEN last_value < {10**WIDTH}
            THEN lpad(last_value::text, {WIDTH}, '0') ELSE last_value::text END AS number
    ), numbered AS (
        UPDATE invoices
        SET number = taken.number, status = :status, finalized_at = :finalized_at
        FROM taken WHERE invoices.id = :invoice_id
        RETURNING invoices.number
    ), announced AS (
        UPDATE webhook_events
        SET payload = jsonb_set(payload::jsonb, '{{number}}', to_jsonb(numbered.number))::json
        FROM numbered WHERE webhook_events.id = :event_id
        RETURNING webhook_events.id
    )
    SELECT number FROM numbered
    """
).bindparams(bindparam("finalized_at", type_=UTCDateTime()))


def _create(session: Session, sequence: str) -> None:
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(
        insert(NumberSequence)
        .values(name=sequence, last_value=0)
        .on_conflict_do_nothing(index_elements=["name"])
    )


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
