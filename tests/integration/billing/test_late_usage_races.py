"""Late usage on PostgreSQL: invoice runs that race (the same period, or the next two periods at
once) bill each adjustment exactly once, and credit a negative one exactly once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing import BillingService, InvoicePolicy
from billing.db import make_session_factory
from billing.models import CreditNote, Invoice, InvoiceLine
from tests.unit.billing.test_adjustments import tiered_plan
from tests.unit.billing.test_lifecycle import seed_plan

pytestmark = pytest.mark.postgres

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)
APR = datetime(2025, 4, 1, tzinfo=UTC)
POLICY = InvoicePolicy(late_usage_lookback=timedelta(days=100))


def service(session, tenant: str) -> BillingService:
    return BillingService(
        session=session, tenant_id=tenant, now=lambda: APR + timedelta(days=1), policy=POLICY
    )


def generate(factory, tenant: str, start: datetime, end: datetime) -> str:
    with factory.begin() as session:
        return service(session, tenant).generate_monthly_invoice(
            period_start=start, period_end=end, currency="usd"
        )


def january_then_late(factory, tenant: str, on_time: int, late: int) -> str:
    with factory.begin() as session:
        service(session, tenant).record_usage(
            metric="tokens", amount=on_time, at=JAN + timedelta(days=3), idempotency_key="a"
        )
    january = generate(factory, tenant, JAN, FEB)
    with factory.begin() as session:
        service(session, tenant).record_usage(
            metric="tokens", amount=late, at=JAN + timedelta(days=20), idempotency_key="late"
        )
    return january


def adjustments(factory) -> list[tuple[int, int, str | None]]:
    with factory() as session:
        rows = session.execute(
            select(InvoiceLine.quantity, InvoiceLine.amount, InvoiceLine.adjusts_invoice_id).where(
                InvoiceLine.kind == "adjustment"
            )
        )
        return [tuple(row) for row in rows]


@pytest.fixture
def factory(pg_engine):
    return make_session_factory(pg_engine)


def test_racing_runs_of_the_next_invoice_bill_the_adjustment_once(factory, race) -> None:
    with factory.begin() as session:
        seed_plan(session, ["t00"])
    january = january_then_late(factory, "t00", 100, 10)
    results = race(8, lambda _: generate(factory, "t00", FEB, MAR))
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    assert adjustments(factory) == [(10, 20, january)]


def test_the_next_two_invoices_generated_at_once_bill_the_adjustment_once(factory, race) -> None:
    with factory.begin() as session:
        seed_plan(session, ["t00"])
    january = january_then_late(factory, "t00", 100, 10)
    periods = [(FEB, MAR), (MAR, APR)]
    results = race(8, lambda i: generate(factory, "t00", *periods[i % 2]))
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 2
    assert adjustments(factory) == [(10, 20, january)]
    with factory() as session:
        totals = sorted(session.execute(select(Invoice.total_amount)).scalars())
    assert totals == [1000, 1020, 1200]  # March or February carries it, not both


def test_racing_runs_credit_a_negative_difference_once(factory, race) -> None:
    with factory.begin() as session:
        tiered_plan(session, "volume")
    january = january_then_late(factory, "t9", 100, 10)
    periods = [(FEB, MAR), (MAR, APR)]
    results = race(8, lambda i: generate(factory, "t9", *periods[i % 2]))
    assert all(isinstance(r, str) for r in results), results
    with factory() as session:
        notes = session.execute(select(CreditNote.invoice_id, CreditNote.amount)).all()
    assert [tuple(n) for n in notes] == [(january, 90)]
    assert adjustments(factory) == []
