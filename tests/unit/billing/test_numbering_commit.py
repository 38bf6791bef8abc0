"""`number_invoice(commit=True)` on PostgreSQL: the numbering statement goes with the COMMIT
(`billing.driver_sql.rows_and_commit`), so the invoice is numbered and visible to others
before the caller's own commit (which finds nothing left to send)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select

from billing import BillingService
from billing.db import make_session_factory
from billing.models import Invoice

from .test_lifecycle import FEB, JAN, LATER, seed_plan

pytestmark = pytest.mark.postgres


def test_with_commit_the_invoice_is_numbered_and_visible_to_others_before_the_callers_commit(
    pg_engine: Engine,
) -> None:
    """PostgreSQL sends the numbering statement with the COMMIT (`commit=True`)."""
    factory = make_session_factory(pg_engine)
    with factory() as session:
        seed_plan(session, ["t1"])
        session.commit()
        invoice_id = BillingService(
            session=session, tenant_id="t1", now=lambda: LATER
        ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd", commit=True)
        with factory() as other:
            seen = other.execute(select(Invoice.status, Invoice.number)).one()
        assert tuple(seen) == ("open", "INV-000001")
        session.rollback()  # nothing left to undo
    with factory() as session:
        assert session.get(Invoice, invoice_id).number == "INV-000001"
