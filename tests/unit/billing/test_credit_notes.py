"""Credit notes on open and paid invoices: their own gapless CN- numbers, never more than the
invoice's total, one event each, nothing stored when refused. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from billing import (
    CreditExceedsInvoiceError,
    InvalidCreditNoteError,
    InvoiceStateError,
    UnknownInvoiceError,
)
from billing.models import CreditNote, CreditNoteLine, InvoiceLine
from tests.unit.billing.test_lifecycle import FEB, JAN, LATER, MAR, events, generate, service
from tests.unit.billing.test_lifecycle import plan as plan  # a fixture
from webhooks.models import WebhookEvent


def count(session, model) -> int:
    return session.execute(select(func.count()).select_from(model)).scalar_one()


def test_credit_notes_are_numbered_and_announced_once_each(session, plan) -> None:
    invoice = generate(session)  # $10.00
    first = service(session).create_credit_note(invoice.id, amount=300, reason="outage")
    second = service(session).create_credit_note(invoice.id, amount=700, reason="goodwill")
    assert [(n.number, n.amount, n.currency) for n in (first, second)] == [
        ("CN-000001", 300, "usd"),
        ("CN-000002", 700, "usd"),
    ]
    assert invoice.number == "INV-000001"  # the invoice sequence is apart
    created = [p for topic, p in events(session) if topic == "billing.credit_note.created"]
    assert created == [
        {
            "tenant_id": "t1",
            "credit_note_id": first.id,
            "invoice_id": invoice.id,
            "number": "CN-000001",
            "amount": 300,
            "currency": "usd",
        },
        {
            "tenant_id": "t1",
            "credit_note_id": second.id,
            "invoice_id": invoice.id,
            "number": "CN-000002",
            "amount": 700,
            "currency": "usd",
        },
    ]
    assert [n.id for n in service(session).list_credit_notes(invoice.id)] == [first.id, second.id]
    ids = session.execute(
        select(WebhookEvent.id)
        .where(WebhookEvent.topic == "billing.credit_note.created")
        .order_by(WebhookEvent.created_at)
    ).scalars()
    # The event's id is the note's: a retry of the same transaction cannot announce it twice.
    assert list(ids) == [f"credit_note_created_{note.id}" for note in (first, second)]


def test_credit_notes_are_listed_oldest_first_and_by_number_at_the_same_instant(
    session, plan
) -> None:
    invoice = generate(session)
    hour = timedelta(hours=1)
    service(session, now=LATER + 2 * hour).create_credit_note(invoice.id, amount=1, reason="a")
    service(session, now=LATER + hour).create_credit_note(invoice.id, amount=1, reason="b")
    for number in ("CN-000009", "CN-000008"):  # stored in the opposite order of their numbers
        session.add(
            CreditNote(
                invoice_id=invoice.id,
                tenant_id="t1",
                number=number,
                amount=1,
                currency="usd",
                reason="imported",
                created_at=LATER + 3 * hour,
            )
        )
    session.flush()
    listed = [note.number for note in service(session).list_credit_notes(invoice.id)]
    assert listed == ["CN-000002", "CN-000001", "CN-000008", "CN-000009"]


def test_the_credit_notes_of_an_invoice_never_exceed_its_total(session, plan) -> None:
    invoice = generate(session)
    service(session).create_credit_note(invoice.id, amount=999, reason="almost all")
    with pytest.raises(CreditExceedsInvoiceError) as raised:
        service(session).create_credit_note(invoice.id, amount=2, reason="one cent too many")
    assert (str(raised.value), raised.value.invoice_id, raised.value.available) == (
        "the invoice has 1 left to credit, not 2",
        invoice.id,
        1,
    )
    assert count(session, CreditNote) == 1
    assert service(session).create_credit_note(invoice.id, amount=1, reason="the rest").amount == 1


def test_a_paid_invoice_can_be_credited_a_draft_or_void_one_cannot(session, plan) -> None:
    paid = generate(session)
    service(session).pay_invoice(paid.id)
    assert service(session).create_credit_note(paid.id, amount=5, reason="refund").amount == 5
    draft = generate(session, "t2", grace_period=timedelta(days=3))
    void = generate(session, "t3")
    service(session, "t3").void_invoice(void.id)
    for tenant, invoice in (("t2", draft), ("t3", void)):
        with pytest.raises(InvoiceStateError) as raised:
            service(session, tenant).create_credit_note(invoice.id, amount=5, reason="no")
        assert (str(raised.value), raised.value.invoice_id, raised.value.status) == (
            f"a {invoice.status} invoice cannot be credited",
            invoice.id,
            invoice.status,
        )
    assert (draft.status, void.status) == ("draft", "void")
    with pytest.raises(UnknownInvoiceError):
        service(session, "t2").create_credit_note(paid.id, amount=5, reason="not mine")
    assert count(session, CreditNote) == 1


def test_a_credit_note_by_lines_adds_them_up(session, plan) -> None:
    service(session).record_usage(
        metric="tokens", amount=50, at=JAN + timedelta(days=2), idempotency_key="k"
    )
    invoice = generate(session)
    tokens_line = session.execute(
        select(InvoiceLine.id).where(
            InvoiceLine.invoice_id == invoice.id, InvoiceLine.metric == "tokens"
        )
    ).scalar_one()
    note = service(session).create_credit_note(
        invoice.id,
        lines=[
            {"amount": 100, "invoice_line_id": tokens_line, "description": "tokens refunded"},
            {"amount": 50},
        ],
        reason="bad batch",
    )
    assert note.amount == 150
    rows = session.execute(select(CreditNoteLine).order_by(CreditNoteLine.position)).scalars()
    assert [(r.invoice_line_id, r.amount, r.description) for r in rows] == [
        (tokens_line, 100, "tokens refunded"),
        (None, 50, None),
    ]


def test_a_credit_of_zero_is_refused_saying_the_amount_must_be_positive(session, plan) -> None:
    invoice = generate(session)
    with pytest.raises(InvalidCreditNoteError, match="^amount must be a positive integer$"):
        service(session).create_credit_note(invoice.id, amount=0, reason="r")


def test_a_line_that_is_not_an_object_is_refused_by_its_index(session, plan) -> None:
    invoice = generate(session)
    with pytest.raises(InvalidCreditNoteError, match=r"^lines\[1\] must be an object$") as raised:
        service(session).create_credit_note(invoice.id, lines=[{"amount": 5}, 5], reason="r")
    assert raised.value.field == "lines[1]"
    assert count(session, CreditNote) == 0


POSITIVE = "must be a positive integer"
EITHER = "give either amount or lines"
REASON = "reason must be 1 to 500 characters"
LINES = "lines must hold 1 to 100 lines"
DESCRIPTION = "lines[0].description must be 1 to 200 characters"


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"amount": 0, "reason": "r"}, "amount", f"amount {POSITIVE}"),
        ({"amount": -5, "reason": "r"}, "amount", f"amount {POSITIVE}"),
        ({"amount": 1.5, "reason": "r"}, "amount", f"amount {POSITIVE}"),
        ({"amount": True, "reason": "r"}, "amount", f"amount {POSITIVE}"),
        ({"reason": "r"}, "amount", EITHER),
        ({"amount": 5, "lines": [{"amount": 5}], "reason": "r"}, "amount", EITHER),
        ({"amount": 5, "reason": " "}, "reason", REASON),
        ({"amount": 5, "reason": "r" * 501}, "reason", REASON),
        ({"lines": [], "reason": "r"}, "lines", LINES),
        ({"lines": "abc", "reason": "r"}, "lines", LINES),
        ({"lines": [{"amount": 1}] * 101, "reason": "r"}, "lines", LINES),
        (
            {"lines": [{"amount": 0}], "reason": "r"},
            "lines[0].amount",
            f"lines[0].amount {POSITIVE}",
        ),
        (
            {"lines": [{"amount": 5, "description": ""}], "reason": "r"},
            "lines[0].description",
            DESCRIPTION,
        ),
        (
            {"lines": [{"amount": 5, "description": "d" * 201}], "reason": "r"},
            "lines[0].description",
            DESCRIPTION,
        ),
        (
            {"lines": [{"amount": 5}, {"amount": 5, "invoice_line_id": "x" * 37}], "reason": "r"},
            "lines[1].invoice_line_id",
            "lines[1].invoice_line_id must be 1 to 36 characters",
        ),
        (
            {"lines": [{"amount": 5, "invoice_line_id": "nope"}], "reason": "r"},
            "lines.invoice_line_id",
            "a line names no line of this invoice",
        ),
    ],
)
def test_a_malformed_credit_note_is_refused_and_nothing_stored(
    session, plan, kwargs, field, message
) -> None:
    invoice = generate(session)
    with pytest.raises(InvalidCreditNoteError) as raised:
        service(session).create_credit_note(invoice.id, **kwargs)
    assert (raised.value.field, str(raised.value)) == (field, message)
    assert count(session, CreditNote) == 0


def test_a_reason_of_500_characters_and_100_lines_are_accepted(session, plan) -> None:
    invoice = generate(session)  # $10.00
    note = service(session).create_credit_note(
        invoice.id, lines=[{"amount": 1}] * 100, reason="r" * 500
    )
    assert (note.amount, len(note.reason), count(session, CreditNoteLine)) == (100, 500, 100)


def test_a_line_of_the_tenants_other_invoice_is_refused_and_nothing_stored(session, plan) -> None:
    service(session).record_usage(
        metric="tokens", amount=50, at=JAN + timedelta(days=2), idempotency_key="k"
    )
    january = generate(session)
    february = generate(session, start=FEB, end=MAR)
    january_line = session.execute(
        select(InvoiceLine.id).where(InvoiceLine.invoice_id == january.id).limit(1)
    ).scalar_one()
    with pytest.raises(InvalidCreditNoteError) as raised:
        service(session).create_credit_note(
            february.id, lines=[{"amount": 5, "invoice_line_id": january_line}], reason="r"
        )
    assert (raised.value.field, str(raised.value)) == (
        "lines.invoice_line_id",
        "a line names no line of this invoice",
    )
    assert count(session, CreditNote) == 0
