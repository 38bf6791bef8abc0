"""Gapless number sequences: `last_number` reads what `next_number` issued, per sequence; an
invoice and its finalized event (its tenant's) get the same number, with every digit past the
sixth."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

import webhooks
from billing import BillingService
from billing.models import Invoice, NumberSequence
from billing.numbering import (
    CREDIT_NOTE_SEQUENCE,
    INVOICE_SEQUENCE,
    last_number,
    next_number,
    number_invoice,
)
from webhooks.models import WebhookEvent
from webhooks.sqltypes import new_id

from .test_lifecycle import FEB, JAN, LATER, generate, seed_plan


def test_last_number_is_zero_before_the_first_and_then_the_last_issued(session) -> None:
    assert last_number(session, INVOICE_SEQUENCE) == 0
    assert next_number(session, INVOICE_SEQUENCE, "INV-") == "INV-000001"
    assert next_number(session, INVOICE_SEQUENCE, "INV-") == "INV-000002"
    assert next_number(session, CREDIT_NOTE_SEQUENCE, "CN-") == "CN-000001"
    assert last_number(session, INVOICE_SEQUENCE) == 2
    assert last_number(session, CREDIT_NOTE_SEQUENCE) == 1
    assert last_number(session, "unused") == 0


def test_an_invoice_past_the_sixth_digit_keeps_every_digit_on_it_and_its_event(session) -> None:
    session.execute(delete(NumberSequence))
    session.add(NumberSequence(name=INVOICE_SEQUENCE, last_value=999_999))
    seed_plan(session, ["t1", "t2"])
    numbers = [generate(session, tenant).number for tenant in ("t1", "t2")]
    assert numbers == ["INV-1000000", "INV-1000001"]
    announced = session.execute(
        select(WebhookEvent.tenant_id, WebhookEvent.payload).where(
            WebhookEvent.topic == "billing.invoice.finalized"
        )
    )
    # Each event is its invoice's tenant's (PostgreSQL stores it in the numbering statement).
    assert sorted((payload["number"], tenant) for tenant, payload in announced) == [
        (numbers[0], "t1"),
        (numbers[1], "t2"),
    ]
    assert last_number(session, INVOICE_SEQUENCE) == 1_000_001


class RelayingOutbox:
    """An outbox other than the `webhooks` module: it stores through `webhooks.publish`."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(
        self, session: Session, topic: str, payload: Mapping[str, Any], **options: Any
    ) -> str:
        self.topics.append(topic)
        return webhooks.publish(session, topic, payload, **options)


def test_with_another_outbox_the_finalized_event_it_stored_gets_the_invoice_s_number(
    session,
) -> None:
    """The numbering patches the event the outbox stored (PostgreSQL: `_NUMBER_INVOICE`)."""
    seed_plan(session, ["t1"])
    outbox = RelayingOutbox()
    invoice_id = BillingService(
        session=session, tenant_id="t1", now=lambda: LATER, outbox=outbox
    ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    number = session.get(Invoice, invoice_id).number
    assert number == "INV-000001"
    assert "billing.invoice.finalized" in outbox.topics
    announced = session.execute(
        select(WebhookEvent.payload).where(WebhookEvent.topic == "billing.invoice.finalized")
    ).scalar_one()
    assert announced["number"] == number


def test_without_commit_a_rolled_back_numbering_gives_its_number_back(session) -> None:
    """`number_invoice` takes the number in the caller's transaction unless told to commit."""
    seed_plan(session, ["t1"])
    draft = generate(session, "t1", grace_period=timedelta(days=3))
    session.commit()
    number = number_invoice(session, draft.id, new_id(), "INV-", finalized_at=LATER)
    assert number == "INV-000001"
    session.rollback()
    assert session.get(Invoice, draft.id).number is None
    assert last_number(session, INVOICE_SEQUENCE) == 0
