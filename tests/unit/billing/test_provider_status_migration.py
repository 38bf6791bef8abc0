"""Migration 0015 on a database holding the previous release's invoices: those already synced
count as reported in their status now (nothing is sent again), the others as never sent."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from billing.migrate import downgrade, upgrade

JAN = datetime(2025, 1, 1, tzinfo=UTC)
ROWS = [  # (id, status, provider id)
    ("synced-paid", "paid", "in_1"),
    ("synced-open", "open", "in_2"),
    ("unsynced-paid", "paid", None),
    ("draft", "draft", None),
]


def test_synced_invoices_keep_the_provider_as_it_is(engine) -> None:
    downgrade(engine, "0014_tenants")
    with engine.begin() as conn:
        for month, (invoice_id, status, provider_id) in enumerate(ROWS, start=1):
            conn.execute(
                text(
                    "INSERT INTO invoices (id, tenant_id, period_start, period_end, status, "
                    "total_amount, currency, created_at, provider_invoice_id) VALUES (:id, 't1', "
                    ":start, :end, :status, 100, 'usd', :start, :provider)"
                ),
                {
                    "id": invoice_id,
                    "start": JAN.replace(month=month),
                    "end": JAN.replace(month=month + 1),
                    "status": status,
                    "provider": provider_id,
                },
            )
    upgrade(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, status, provider_status FROM invoices ORDER BY id"))
        assert sorted(rows.all()) == [
            ("draft", "draft", None),
            ("synced-open", "open", "open"),
            ("synced-paid", "paid", "paid"),
            ("unsynced-paid", "paid", None),
        ]
