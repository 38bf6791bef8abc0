"""Migration 0012 on a database holding the previous release's invoices: statuses kept (open,
paid, void), numbers given in creation order, and the sequence continues after them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from billing import BillingService
from billing.migrate import downgrade, upgrade
from billing.models import Invoice

JAN = datetime(2025, 1, 1, tzinfo=UTC)
ROWS = [  # (id, tenant, month, status, created at), inserted out of creation order
    ("c", "t1", 3, "open", JAN + timedelta(days=70)),
    ("a", "t1", 1, "paid", JAN + timedelta(days=10)),
    ("d", "t2", 1, "void", JAN + timedelta(days=10)),
    ("b", "t2", 2, "open", JAN + timedelta(days=40)),
]


def test_existing_invoices_keep_their_status_and_get_numbers_in_creation_order(engine) -> None:
    downgrade(engine, "0011_usage_aggregate_groups")
    with engine.begin() as conn:
        for invoice_id, tenant, month, status, created in ROWS:
            conn.execute(
                text(
                    "INSERT INTO invoices (id, tenant_id, period_start, period_end, status, "
                    "total_amount, currency, created_at) VALUES (:id, :tenant, :start, :end, "
                    ":status, 100, 'usd', :created)"
                ),
                {
                    "id": invoice_id,
                    "tenant": tenant,
                    "start": JAN.replace(month=month),
                    "end": JAN.replace(month=month + 1),
                    "status": status,
                    "created": created,
                },
            )
    upgrade(engine)
    from billing.db import make_session_factory

    with make_session_factory(engine).begin() as session:
        rows = session.query(Invoice).order_by(Invoice.number).all()
        assert [(r.id, r.status, r.number) for r in rows] == [
            ("a", "paid", "INV-000001"),
            ("d", "void", "INV-000002"),
            ("b", "open", "INV-000003"),
            ("c", "open", "INV-000004"),
        ]
        service = BillingService(session=session, tenant_id="t2", now=lambda: JAN.replace(month=6))
        reissued = service.generate_monthly_invoice(
            period_start=JAN, period_end=JAN.replace(month=2), currency="usd"
        )
        assert session.get(Invoice, reissued).number == "INV-000005"  # the void one freed Jan
