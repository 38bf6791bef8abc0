"""Migration 0017 on a database holding the previous release's invoices and credit notes: their
lines become `charge` lines, credit note lines keep no late quantity, and late usage of such an
invoice is billed as an adjustment afterwards."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, select, text

from billing import BillingService
from billing.db import make_session_factory
from billing.migrate import downgrade, upgrade
from billing.models import CreditNoteLine, InvoiceLine
from webhooks.sqltypes import UTCDateTime

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)


def test_existing_lines_become_charges_and_their_late_usage_is_adjusted(engine) -> None:
    downgrade(engine, "0016_price_dimensions")
    with engine.begin() as conn:
        statements = [
            "INSERT INTO plans (id, key, name, created_at) VALUES ('p', 'pro', 'Pro', :at)",
            "INSERT INTO prices (id, key, currency, unit_amount, metric, created_at, plan_id, "
            "billing_scheme) VALUES ('tok', 'tokens', 'usd', 2, 'tokens', :at, 'p', 'per_unit')",
            "INSERT INTO subscriptions (id, tenant_id, plan_id, effective_at, created_at) "
            "VALUES ('s', 't1', 'p', :jan, :at)",
            "INSERT INTO invoices (id, tenant_id, period_start, period_end, status, total_amount, "
            "currency, created_at, number) VALUES ('i', 't1', :jan, :feb, 'open', 200, 'usd', "
            ":at, 'INV-000001')",
            "DELETE FROM number_sequences WHERE name = 'invoice'",
            "INSERT INTO number_sequences (name, last_value) VALUES ('invoice', 1)",
            "INSERT INTO invoice_lines (id, invoice_id, price_id, metric, quantity, amount, "
            "created_at) VALUES ('l', 'i', 'tok', 'tokens', 100, 200, :at)",
            "INSERT INTO credit_notes (id, invoice_id, tenant_id, number, amount, currency, "
            "reason, created_at) VALUES ('c', 'i', 't1', 'CN-000001', 5, 'usd', 'goodwill', :at)",
            "INSERT INTO credit_note_lines (id, credit_note_id, position, invoice_line_id, "
            "amount) VALUES ('cl', 'c', 0, 'l', 5)",
            "INSERT INTO usage_events (id, tenant_id, metric, amount, at_ts, idempotency_key, "
            "created_at) VALUES ('e', 't1', 'tokens', 100, :jan, 'a', :at)",
        ]
        for statement in statements:
            times = [bindparam(name, type_=UTCDateTime()) for name in ("at", "jan", "feb")]
            query = text(statement).bindparams(*(t for t in times if f":{t.key}" in statement))
            conn.execute(query, {"at": FEB, "jan": JAN, "feb": FEB})
    upgrade(engine)
    with make_session_factory(engine).begin() as session:
        line = session.get(InvoiceLine, "l")
        assert (line.kind, line.adjusts_invoice_id) == ("charge", None)
        assert session.get(CreditNoteLine, "cl").quantity is None
        service = BillingService(session=session, tenant_id="t1", now=lambda: MAR)
        service.record_usage(
            metric="tokens", amount=10, at=JAN + timedelta(days=20), idempotency_key="late"
        )
        service.generate_monthly_invoice(period_start=FEB, period_end=MAR, currency="usd")
        adjusted = session.execute(
            select(InvoiceLine.quantity, InvoiceLine.amount, InvoiceLine.adjusts_invoice_id).where(
                InvoiceLine.kind == "adjustment"
            )
        ).all()
        # the goodwill credit note is not late usage: the 10 late units bill 20
        assert [tuple(row) for row in adjusted] == [(10, 20, "i")]
