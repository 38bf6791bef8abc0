"""With a grace period, usage recorded for a draft's period re-prices the draft at once (same id,
lines replaced), by `record_usage`, batches and `POST /usage`; duplicates, other periods and
other tenants leave it alone. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from billing.models import Invoice, InvoiceLine
from tests.unit.billing.test_lifecycle import FEB, JAN, MAR, generate, lines_of, service
from tests.unit.billing.test_lifecycle import plan as plan

GRACE = {"grace_period": timedelta(days=3)}
MID_JAN = JAN + timedelta(days=14)


def use(session, amount, key, at=MID_JAN, tenant="t1") -> str:
    return service(session, tenant).record_usage(
        metric="tokens", amount=amount, at=at, idempotency_key=key
    )


def line_ids(session, invoice_id) -> set[str]:
    query = select(InvoiceLine.id).where(InvoiceLine.invoice_id == invoice_id)
    return set(session.execute(query).scalars())


def reread(session, invoice_id) -> Invoice:
    session.expire_all()
    invoice = session.get(Invoice, invoice_id)
    assert invoice is not None
    return invoice


def test_usage_in_a_drafts_period_re_prices_it_at_once(session, plan) -> None:
    draft = generate(session, **GRACE)
    before = line_ids(session, draft.id)
    use(session, 50, "a")
    invoice = reread(session, draft.id)
    assert (invoice.status, invoice.total_amount) == ("draft", 1100)
    assert lines_of(session, invoice) == [("", 1, 1000), ("tokens", 50, 100)]
    assert line_ids(session, draft.id).isdisjoint(before)  # replaced, not added to


def test_a_duplicate_another_period_or_another_tenant_leaves_the_draft_alone(session, plan) -> None:
    use(session, 50, "a")
    draft = generate(session, **GRACE)
    before = line_ids(session, draft.id)
    use(session, 50, "a")  # the same event again
    use(session, 7, "next-period", at=FEB)  # exactly at the draft's end: February's
    use(session, 9, "before", at=JAN - timedelta(microseconds=1))
    use(session, 500, "other", tenant="t2")
    assert line_ids(session, draft.id) == before
    assert reread(session, draft.id).total_amount == 1100


def test_usage_at_the_drafts_first_instant_re_prices_it(session, plan) -> None:
    draft = generate(session, **GRACE)
    use(session, 3, "first", at=JAN)
    assert reread(session, draft.id).total_amount == 1006


def test_a_batch_re_prices_every_draft_it_touches(session, plan) -> None:
    january = generate(session, **GRACE)
    february = generate(session, start=FEB, end=MAR, **GRACE)
    service(session).record_usage_batch(
        [
            {"metric": "tokens", "amount": 10, "at": MID_JAN, "idempotency_key": "j"},
            {"metric": "tokens", "amount": 20, "at": FEB, "idempotency_key": "f1"},
            {
                "metric": "tokens",
                "amount": 30,
                "at": MAR - timedelta(days=1),
                "idempotency_key": "f2",
            },
        ]
    )
    assert reread(session, january.id).total_amount == 1020
    assert reread(session, february.id).total_amount == 1100


def test_a_finalized_invoice_is_not_re_priced_by_usage(session, plan) -> None:
    invoice = generate(session)
    before = line_ids(session, invoice.id)
    use(session, 50, "late")
    assert (reread(session, invoice.id).total_amount, line_ids(session, invoice.id)) == (
        1000,
        before,
    )
