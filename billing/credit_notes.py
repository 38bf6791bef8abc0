"""Credit notes: money given back on a finalized (`open` or `paid`) invoice.

A credit note is an `amount`, or `lines` (each an amount, optionally against one line of the
invoice, with a description) that add up to it, and a `reason`. It takes its number from its
own gapless sequence (`CN-000001`, …) and is announced by `billing.credit_note.created` in the
same transaction. The invoice row is locked first, so the credit notes of an invoice, also
requested concurrently on PostgreSQL, never add up to more than its total.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from billing.errors import CreditExceedsInvoiceError, InvalidCreditNoteError, InvoiceStateError
from billing.lifecycle import Outbox, own_invoice
from billing.models import CreditNote, CreditNoteLine, InvoiceLine
from billing.numbering import CREDIT_NOTE_SEQUENCE, next_number

CREDIT_NOTE_CREATED = "billing.credit_note.created"
CREDIT_NOTE_PREFIX = "CN-"
CREDITABLE = ("open", "paid")
MAX_REASON = 500
MAX_DESCRIPTION = 200
MAX_LINES = 100


@dataclass(frozen=True, slots=True)
class CreditLine:
    """A validated credit note line."""

    amount: int
    invoice_line_id: str | None = None
    description: str | None = None
    quantity: int | None = None


def validate(amount: object, lines: object, reason: object) -> tuple[int, list[CreditLine], str]:
    """Check a credit note's input; return (amount, lines, reason).

    Raises:
        InvalidCreditNoteError: neither or both of `amount` and `lines`, an amount that is not
            a positive `int`, a malformed line, or an empty or over-long reason.
    """
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise InvalidCreditNoteError(f"reason must be 1 to {MAX_REASON} characters", field="reason")
    if (amount is None) == (lines is None):
        raise InvalidCreditNoteError("give either amount or lines", field="amount")
    if lines is None:
        return _positive(amount, "amount"), [], reason
    if not isinstance(lines, Sequence) or isinstance(lines, str) or not 0 < len(lines) <= MAX_LINES:
        raise InvalidCreditNoteError(f"lines must hold 1 to {MAX_LINES} lines", field="lines")
    checked = [_line(index, line) for index, line in enumerate(lines)]
    return sum(line.amount for line in checked), checked, reason


def create(
    session: Session,
    tenant_id: str,
    invoice_id: str,
    *,
    amount: int,
    lines: list[CreditLine],
    reason: str,
    now: Callable[[], datetime],
    outbox: Outbox,
) -> CreditNote:
    """Store a validated credit note on the tenant's invoice and announce it.

    Raises:
        UnknownInvoiceError: the tenant has no invoice with that id.
        InvoiceStateError: the invoice is not `open` or `paid`.
        CreditExceedsInvoiceError: the invoice's credit notes would exceed its total.
        InvalidCreditNoteError: a line names a line of another invoice.
    """
    invoice = own_invoice(session, tenant_id, invoice_id, lock=True)
    if invoice.status not in CREDITABLE:
        raise InvoiceStateError(
            f"a {invoice.status} invoice cannot be credited",
            invoice_id=invoice.id,
            status=invoice.status,
        )
    available = invoice.total_amount - credited(session, invoice.id)
    if amount > available:
        raise CreditExceedsInvoiceError(
            f"the invoice has {available} left to credit, not {amount}",
            invoice_id=invoice.id,
            available=available,
        )
    _check_invoice_lines(session, invoice.id, lines)
    note = CreditNote(
        invoice_id=invoice.id,
        tenant_id=tenant_id,
        number=next_number(session, CREDIT_NOTE_SEQUENCE, CREDIT_NOTE_PREFIX),
        amount=amount,
        currency=invoice.currency,
        reason=reason,
        created_at=now(),
    )
    note.lines = [
        CreditNoteLine(
            position=position,
            invoice_line_id=line.invoice_line_id,
            description=line.description,
            amount=line.amount,
            quantity=line.quantity,
        )
        for position, line in enumerate(lines)
    ]
    session.add(note)
    session.flush()
    outbox.publish(
        session,
        CREDIT_NOTE_CREATED,
        {
            "tenant_id": tenant_id,
            "credit_note_id": note.id,
            "invoice_id": invoice.id,
            "number": note.number,
            "amount": note.amount,
            "currency": note.currency,
        },
        event_id=f"credit_note_created_{note.id}",
    )
    return note


def credited(session: Session, invoice_id: str) -> int:
    """The sum of the invoice's credit notes."""
    total = session.execute(
        select(func.coalesce(func.sum(CreditNote.amount), 0)).where(
            CreditNote.invoice_id == invoice_id
        )
    ).scalar_one()
    return int(total)


def of_invoice(session: Session, invoice_id: str) -> list[CreditNote]:
    """The invoice's credit notes, oldest first."""
    return list(
        session.execute(
            select(CreditNote)
            .where(CreditNote.invoice_id == invoice_id)
            .order_by(CreditNote.created_at, CreditNote.number)
        ).scalars()
    )


def _positive(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidCreditNoteError(f"{field} must be a positive integer", field=field)
    return value


def _line(index: int, line: object) -> CreditLine:
    field = f"lines[{index}]"
    if not isinstance(line, Mapping):
        raise InvalidCreditNoteError(f"{field} must be an object", field=field)
    amount = _positive(line.get("amount"), f"{field}.amount")
    invoice_line_id = _optional_text(line.get("invoice_line_id"), f"{field}.invoice_line_id", 36)
    description = _optional_text(line.get("description"), f"{field}.description", MAX_DESCRIPTION)
    return CreditLine(amount, invoice_line_id, description)


def _optional_text(value: Any, field: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidCreditNoteError(f"{field} must be 1 to {limit} characters", field=field)
    return value


def _check_invoice_lines(session: Session, invoice_id: str, lines: list[CreditLine]) -> None:
    named = {line.invoice_line_id for line in lines if line.invoice_line_id is not None}
    if not named:
        return
    found = set(
        session.execute(
            select(InvoiceLine.id).where(
                InvoiceLine.invoice_id == invoice_id, InvoiceLine.id.in_(named)
            )
        ).scalars()
    )
    if named - found:
        raise InvalidCreditNoteError(
            "a line names no line of this invoice", field="lines.invoice_line_id"
        )
