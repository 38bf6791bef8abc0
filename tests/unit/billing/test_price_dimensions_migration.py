"""Migration 0016 on a database holding the previous release's prices and invoices: they keep
their rows, without dimensions, and bill as before."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from billing import BillingService
from billing.db import make_session_factory
from billing.migrate import downgrade, upgrade
from billing.models import Invoice, InvoiceLine, Price

JAN, FEB = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC)


def test_prices_and_lines_of_the_previous_release_have_no_dimensions_and_bill_alike(
    engine,
) -> None:
    downgrade(engine, "0015_invoice_provider_status")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO plans (id, key, name, created_at) VALUES ('p', 'pro', 'Pro', :at);"),
            {"at": JAN},
        )
        conn.execute(
            text(
                "INSERT INTO prices (id, key, currency, unit_amount, metric, created_at, plan_id,"
                " billing_scheme) VALUES ('pr', 'tok', 'usd', 2, 'tokens', :at, 'p', 'per_unit')"
            ),
            {"at": JAN},
        )
        conn.execute(
            text(
                "INSERT INTO subscriptions (id, tenant_id, plan_id, effective_at, created_at)"
                " VALUES ('s', 't', 'p', :at, :at)"
            ),
            {"at": JAN},
        )
        conn.execute(
            text(
                "INSERT INTO invoices (id, tenant_id, period_start, period_end, status,"
                " total_amount, currency, created_at) VALUES ('i', 't', :start, :end, 'paid',"
                " 8, 'usd', :end)"
            ),
            {"start": JAN.replace(year=2024, month=12), "end": JAN},
        )
        conn.execute(
            text(
                "INSERT INTO invoice_lines (id, invoice_id, price_id, metric, quantity, amount,"
                " created_at) VALUES ('l', 'i', 'pr', 'tokens', 4, 8, :at)"
            ),
            {"at": JAN},
        )
    upgrade(engine)
    with make_session_factory(engine).begin() as session:
        assert session.get(Price, "pr").dimensions is None
        old = session.get(InvoiceLine, "l")
        assert (old.quantity, old.amount, old.dimensions) == (4, 8, None)
        bs = BillingService(session=session, tenant_id="t", now=lambda: FEB)
        bs.record_usage(metric="tokens", amount=5, at=JAN, idempotency_key="k", metadata={"m": 1})
        invoice = session.get(
            Invoice, bs.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
        )
        assert [(ln.quantity, ln.amount, ln.dimensions) for ln in invoice.lines] == [(5, 10, None)]
