"""Gapless numbers (`INV-000042`, `CN-000007`) taken inside the caller's transaction.

Each sequence is one row of `number_sequences`. `UPDATE … SET last_value = last_value + 1
RETURNING last_value` locks that row until the transaction ends, so on PostgreSQL concurrent
finalizers take numbers one after another in commit order, and a transaction that rolls back
gives its number back: no gap, no duplicate. (SQLite has a single writer anyway.)

Every other finalizer waits on that row from the moment a number is taken to the COMMIT, so
an invoice takes its number last (`number_invoice`): one statement finalizes and numbers the
invoice and numbers its `billing.invoice.finalized` event (stores it, numbered, with the SQL
outbox), and only the COMMIT follows; a caller whose transaction ends there sends the COMMIT
with it (`commit=True`), so the row is held only while the server runs them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg.types.json import Json
from sqlalchemy import String, bindparam, cast, column, func, literal_column, select, table, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

import webhooks
from billing import driver_sql
from billing.models import Invoice, NumberSequence
from webhooks.interfaces import NewEvent
from webhooks.models import WebhookEvent
from webhooks.outbox import publishing_ctes
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
    event: NewEvent | None = None,
    commit: bool = False,
) -> str:
    """Finalize the invoice: take the next number of `sequence` for it and write it, the status
    `open` and `finalized_at` into the invoice's row, and the number into its stored event
    `event_id`; return the number. With `event` (whose id is `event_id`), that event is stored
    here, numbered, in the SQL outbox (as `webhooks.publish` would), not patched.

    Run it last before the commit: the sequence's row stays locked until then. On PostgreSQL it
    is one statement (increment, invoice, event) on the driver's cursor, which makes the
    sequence's row if it is the first number; on SQLite three or four. With `commit`, on
    PostgreSQL, the statement is sent with the COMMIT of the session's transaction
    (`driver_sql.rows_and_commit`): nothing may run in it after this.
    """
    finalized = {"status": "open", "finalized_at": finalized_at}
    if session.get_bind().dialect.name != "postgresql":
        if event is not None:
            webhooks.publish(session, event.topic, event.payload, event_id=event.id)
        number = next_number(session, sequence, prefix)
        invoice = update(Invoice).where(Invoice.id == invoice_id)
        session.execute(invoice.values(number=number, **finalized))
        patched = func.json_set(WebhookEvent.payload, "$.number", number)
        stored = update(WebhookEvent).where(WebhookEvent.id == event_id)
        session.execute(stored.values(payload=patched))
        return number
    names: dict[str, Any] = {
        "sequence": sequence,
        "prefix": prefix,
        "invoice_id": invoice_id,
        "event_id": event_id,
        **finalized,
    }
    if event is not None:
        names.update(
            event_topic=event.topic,
            event_tenant_id=event.tenant_id,
            event_payload=Json(event.payload),
            event_created_at=event.created_at,
        )
    session.flush()  # what the caller changed is written first, as `session.execute` would
    statement = _NUMBER_AND_STORE if event is not None else _NUMBER_INVOICE
    [taken] = statement.rows(session, names, commit=commit)
    return str(taken[0])


# The sequence's row is made by its first number (a COMMIT sent with the statement leaves no
# second try): an upsert locks the row as the UPDATE of its conflict does.
_TAKEN = f"""
    WITH taken AS (
        INSERT INTO number_sequences AS sequence_row (name, last_value)
        VALUES (%(sequence)s::text, 1)
        ON CONFLICT (name) DO UPDATE SET last_value = sequence_row.last_value + 1
        RETURNING CAST(%(prefix)s AS text) || CASE WHEN last_value < {10**WIDTH}
            THEN lpad(last_value::text, {WIDTH}, '0') ELSE last_value::text END AS number
    ), numbered AS (
        UPDATE invoices
        SET number = taken.number, status = %(status)s::text,
            finalized_at = %(finalized_at)s::timestamptz
        FROM taken WHERE invoices.id = %(invoice_id)s::text
        RETURNING invoices.number
    )"""
# Data-modifying CTEs all run, whether the final SELECT reads them or not.
_NUMBER_INVOICE = driver_sql.Compiled(
    _TAKEN
    + """, announced AS (
        UPDATE webhook_events
        SET payload = jsonb_set(payload::jsonb, '{number}', to_jsonb(numbered.number))::json
        FROM numbered WHERE webhook_events.id = %(event_id)s::text
        RETURNING webhook_events.id
    )
    SELECT number FROM numbered
    """,
    {},
)


def _number_and_store() -> driver_sql.Compiled:  # pragma: no mutate block
    """`_NUMBER_INVOICE` that stores the event (`webhooks.outbox.publishing_ctes`) with the
    number in its payload, instead of patching it: an UPDATE cannot see a row its own
    statement inserts."""
    numbered = table("numbered", column("number"))
    payload = func.jsonb_set(
        cast(bindparam("event_payload", type_=JSONB()), JSONB),
        literal_column("'{number}'"),
        func.to_jsonb(numbered.c.number),
    )
    published = publishing_ctes(
        select(
            bindparam("event_id", type_=String()),
            bindparam("event_topic", type_=String()),
            bindparam("event_tenant_id", type_=String()),
            cast(payload, postgresql.JSON),
            bindparam("event_created_at", type_=UTCDateTime()),
        ).select_from(numbered)
    )
    events = driver_sql.compiled(
        select(numbered.c.number, published.notify()).add_cte(
            published.events, published.deliveries
        )
    )
    # SQLAlchemy's WITH, joined to the numbering's: `WITH taken …, numbered …, published …`.
    body = events.sql.removeprefix("WITH ")
    return driver_sql.Compiled(_TAKEN + ", " + body, events.literals)


_NUMBER_AND_STORE = _number_and_store()


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
