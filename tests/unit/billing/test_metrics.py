"""The ledger's Prometheus metrics move with what it does."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from billing import BillingService, IdempotencyConflictError, InvalidUsageError
from billing.metrics import render

AT = datetime(2025, 1, 1, tzinfo=UTC)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_ingest_says_which_events_were_duplicates(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    first = bs.record_usage(metric="m", amount=1, at=AT, idempotency_key="a")
    results = bs.ingest(
        [
            {"metric": "m", "amount": 1, "at": AT, "idempotency_key": "a"},
            {"metric": "m", "amount": 2, "at": AT, "idempotency_key": "b"},
            {"metric": "m", "amount": 2, "at": AT, "idempotency_key": "b"},
        ]
    )
    assert [(r.duplicate) for r in results] == [True, False, True]
    assert results[0].id == first
    assert results[1].id == results[2].id


def test_ingest_outcomes_are_counted(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    before = {
        o: value("billing_usage_ingest_total", outcome=o)
        for o in ("stored", "duplicate", "rejected")
    }
    bs.record_usage(metric="m", amount=1, at=AT, idempotency_key="a")
    bs.record_usage(metric="m", amount=1, at=AT, idempotency_key="a")
    with pytest.raises(InvalidUsageError):
        bs.record_usage(metric="m", amount=-1, at=AT, idempotency_key="b")
    with pytest.raises(IdempotencyConflictError):
        bs.record_usage(metric="m", amount=5, at=AT, idempotency_key="a")
    after = {o: value("billing_usage_ingest_total", outcome=o) for o in before}
    assert {o: after[o] - before[o] for o in before} == {"stored": 1, "duplicate": 1, "rejected": 2}


def test_aggregations_and_invoices_are_counted_and_exposed(session) -> None:
    bs = BillingService(session=session, tenant_id="t1")
    runs = value("billing_aggregate_duration_ms_count")
    invoices = value("billing_invoice_generated_total")
    bs.aggregate_daily(metric="m", day_start=AT)
    bs.generate_monthly_invoice(period_start=AT, period_end=AT.replace(month=2), currency="usd")
    bs.generate_monthly_invoice(period_start=AT, period_end=AT.replace(month=2), currency="usd")
    assert value("billing_aggregate_duration_ms_count") == runs + 1
    assert value("billing_invoice_generated_total") == invoices + 1
    body, content_type = render()
    assert b"billing_usage_ingest_total" in body
    assert b"billing_provider_sync_failures_total" in body
    assert content_type.startswith("text/plain")
