"""With an `INVOICE_GRACE_PERIOD` an invoice is a draft, re-priced by the usage recorded for its
period, until it is finalized; then it never changes. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from billing.models import Invoice
from tests.unit.billing.test_lifecycle import (
    FEB,
    JAN,
    generate,
    lines_of,
    service,
    topics,
)
from tests.unit.billing.test_lifecycle import plan as plan

GRACE = {"grace_period": timedelta(days=3)}


def use(session, amount, key) -> None:
    service(session).record_usage(
        metric="tokens", amount=amount, at=JAN + timedelta(days=5), idempotency_key=key
    )


def test_a_draft_is_re_priced_by_usage_recorded_before_it_is_finalized(session, plan) -> None:
    draft = generate(session, **GRACE)
    assert (draft.status, draft.total_amount) == ("draft", 1000)
    use(session, 50, "a")
    again = generate(session, **GRACE)
    assert again.id == draft.id
    assert (again.total_amount, lines_of(session, again)) == (
        1100,
        [("", 1, 1000), ("tokens", 50, 100)],
    )
    use(session, 25, "b")
    finalized = service(session).finalize_invoice(draft.id)
    assert (finalized.status, finalized.number, finalized.total_amount) == (
        "open",
        "INV-000001",
        1150,
    )
    assert lines_of(session, finalized) == [("", 1, 1000), ("tokens", 75, 150)]
    [(_, event)] = [e for e in _events(session) if e[0] == "billing.invoice.finalized"]
    assert event["total_amount"] == 1150
    use(session, 10, "c")  # late now: the finalized invoice stays as it was
    assert generate(session, **GRACE).total_amount == 1150
    assert lines_of(session, finalized) == [("", 1, 1000), ("tokens", 75, 150)]


def test_a_draft_left_from_a_grace_period_is_re_priced_when_finalized_without_one(
    session, plan
) -> None:
    draft = generate(session, **GRACE)
    use(session, 50, "a")
    finalized = generate(session)  # the grace period was turned off meanwhile
    assert (finalized.id, finalized.status, finalized.total_amount) == (draft.id, "open", 1100)


def test_creating_a_draft_announces_it_once_and_finalizing_once(session, plan) -> None:
    draft = generate(session, **GRACE)
    generate(session, **GRACE)
    service(session).finalize_invoice(draft.id)
    service(session).finalize_invoice(draft.id)
    assert topics(session) == ["billing.invoice.created", "billing.invoice.finalized"]
    assert session.execute(select(Invoice.period_end)).scalar_one() == FEB


def _events(session):
    from tests.unit.billing.test_lifecycle import events

    return events(session)
