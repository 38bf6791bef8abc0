"""The invoice fan-out also targets tenants with unbilled late usage (LATE_USAGE=next_invoice),
even once their subscription has ended; the job then bills only the adjustment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing import BillingService, InvoicePolicy
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from tests.unit.workers.test_scheduler import Recorder, make_scheduler
from workers import fanout
from workers.jobs import generate_monthly_invoice_job

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)
APR = datetime(2025, 4, 1, tzinfo=UTC)
LOOKBACK = timedelta(days=35)


@pytest.fixture
def january_invoiced(session_factory) -> None:
    """`ended` and `quiet` were subscribed in January only; both have a finalized January
    invoice; `ended` then sends 10 tokens dated in January."""
    with session_factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        session.add(
            Price(key="tokens", plan_id=plan.id, currency="usd", metric="tokens", unit_amount=2)
        )
        for tenant in ("ended", "quiet"):
            session.add(
                Subscription(tenant_id=tenant, plan_id=plan.id, effective_at=JAN, ended_at=FEB)
            )
        session.flush()
        for tenant in ("ended", "quiet"):
            BillingService(
                session=session, tenant_id=tenant, now=lambda: FEB
            ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    with session_factory.begin() as session:
        BillingService(session=session, tenant_id="ended", now=lambda: MAR).record_usage(
            metric="tokens", amount=10, at=JAN + timedelta(days=20), idempotency_key="late"
        )


def targets(session_factory, start, end, now=None, lookback=LOOKBACK) -> list[tuple[str, str]]:
    since = None if lookback is None else (now or end) - lookback
    stream = fanout.invoice_targets(session_factory, start, end, batch_size=1, late_since=since)
    return sorted(stream)


def test_a_tenant_with_late_usage_is_targeted_after_its_subscription_ended(
    session_factory, january_invoiced
) -> None:
    assert targets(session_factory, FEB, MAR) == [("ended", "usd")]
    assert fanout.count_invoice_targets(session_factory, FEB, MAR, late_since=MAR - LOOKBACK) == 1
    assert targets(session_factory, FEB, MAR, lookback=None) == []


def test_late_usage_older_than_the_lookback_targets_nobody(
    session_factory, january_invoiced
) -> None:
    assert targets(session_factory, MAR, APR) == []  # January ended 59 days before April
    assert targets(session_factory, FEB, MAR, now=FEB + LOOKBACK) == [("ended", "usd")]
    edge = FEB + LOOKBACK + timedelta(microseconds=1)
    assert targets(session_factory, FEB, MAR, now=edge) == []


def test_the_job_bills_the_adjustment_alone_and_the_tenant_is_no_longer_targeted(
    session_factory, january_invoiced
) -> None:
    recorder = Recorder()
    scheduler = make_scheduler(
        session_factory,
        send_invoice=recorder,
        late_usage_lookback=LOOKBACK,
        now=lambda: MAR + timedelta(hours=1),
    )
    assert scheduler.fan_out_invoices(FEB, MAR) == 1
    [call] = recorder.calls
    payload = {**call, "period_start": call["period_start"].isoformat()}
    payload["period_end"] = call["period_end"].isoformat()
    invoice_id = generate_monthly_invoice_job(
        session_factory, payload, policy=InvoicePolicy(), now=lambda: MAR + timedelta(days=1)
    )
    with session_factory() as session:
        assert session.get(Invoice, invoice_id).total_amount == 20
        lines = session.scalars(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id))
        assert [(line.kind, line.quantity, line.amount) for line in lines] == [
            ("adjustment", 10, 20)
        ]
    assert targets(session_factory, FEB, MAR) == []  # billed: nothing late since


def test_the_scheduler_does_not_look_for_late_usage_without_a_lookback(
    session_factory, january_invoiced
) -> None:
    assert make_scheduler(session_factory).fan_out_invoices(FEB, MAR) == 0


def test_ignore_gives_the_fan_out_no_lookback() -> None:
    assert InvoicePolicy(late_usage="ignore").late_fanout_lookback is None
    assert InvoicePolicy(late_usage="reject").late_fanout_lookback == LOOKBACK
    assert InvoicePolicy().late_fanout_lookback == LOOKBACK


@pytest.mark.parametrize(("late_usage", "billed"), [("next_invoice", 20), ("ignore", None)])
def test_the_invoice_backfill_bills_late_usage_as_the_deployment_says(
    sqlite_engine, monkeypatch, stub_broker, capsys, late_usage, billed
) -> None:
    from billing.db import make_session_factory
    from workers.cli import main

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("LATE_USAGE", late_usage)
    monkeypatch.setenv("LATE_USAGE_LOOKBACK", "P10000D")  # January 2025 is long ago today
    factory = make_session_factory(sqlite_engine)
    january_invoiced.__wrapped__(factory)  # type: ignore[attr-defined]
    assert main(["invoice", "--period", "2025-02"]) == 0
    with factory() as session:
        february = session.scalars(select(Invoice.total_amount).where(Invoice.period_start == FEB))
        assert list(february) == ([] if billed is None else [billed])
