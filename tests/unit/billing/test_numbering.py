"""Gapless number sequences: `last_number` reads what `next_number` issued, per sequence."""

from __future__ import annotations

from billing.numbering import CREDIT_NOTE_SEQUENCE, INVOICE_SEQUENCE, last_number, next_number


def test_last_number_is_zero_before_the_first_and_then_the_last_issued(session) -> None:
    assert last_number(session, INVOICE_SEQUENCE) == 0
    assert next_number(session, INVOICE_SEQUENCE, "INV-") == "INV-000001"
    assert next_number(session, INVOICE_SEQUENCE, "INV-") == "INV-000002"
    assert next_number(session, CREDIT_NOTE_SEQUENCE, "CN-") == "CN-000001"
    assert last_number(session, INVOICE_SEQUENCE) == 2
    assert last_number(session, CREDIT_NOTE_SEQUENCE) == 1
    assert last_number(session, "unused") == 0
