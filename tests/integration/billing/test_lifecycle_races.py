"""Lifecycle races on PostgreSQL: concurrent finalizers share one gapless sequence, racing
reissues of a voided period make one invoice, racing pay and void leave one outcome."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, select

from billing import BillingService, InvoiceStateError
from billing.db import make_session_factory
from billing.models import Invoice, InvoiceLine, NumberSequence
from billing.numbering import INVOICE_SEQUENCE
from tests.unit.billing.test_lifecycle import seed_plan
from webhooks.models import WebhookEvent

pytestmark = pytest.mark.postgres

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
TENANTS = [f"t{n:02d}" for n in range(12)]


@pytest.fixture
def factory(pg_engine):
    factory = make_session_factory(pg_engine)
    with factory.begin() as session:
        seed_plan(session, TENANTS)
    return factory


def generate(factory, tenant: str) -> str:
    with factory.begin() as session:
        return BillingService(session=session, tenant_id=tenant).generate_monthly_invoice(
            period_start=JAN, period_end=FEB, currency="usd"
        )


def test_concurrent_finalizers_take_unique_gapless_numbers(factory, race) -> None:
    results = race(len(TENANTS), lambda i: generate(factory, TENANTS[i]))
    assert all(isinstance(r, str) for r in results), results
    with factory() as session:
        numbers = sorted(session.execute(select(Invoice.number)).scalars())
    assert numbers == [f"INV-{n:06d}" for n in range(1, len(TENANTS) + 1)]


def test_a_finalizer_that_rolls_back_while_others_commit_leaves_no_gap(factory, race) -> None:
    def work(index: int) -> str | None:
        session = factory()
        try:
            invoice_id = BillingService(
                session=session, tenant_id=TENANTS[index]
            ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
            if index % 3 == 0:
                session.rollback()
                return None
            session.commit()
            return invoice_id
        finally:
            session.close()

    race(len(TENANTS), work)
    with factory() as session:
        numbers = sorted(session.execute(select(Invoice.number)).scalars())
    assert numbers == [f"INV-{n:06d}" for n in range(1, len(numbers) + 1)]
    assert len(numbers) == len([i for i in range(len(TENANTS)) if i % 3])


def test_racing_reissues_of_a_voided_period_make_exactly_one_invoice(factory, race) -> None:
    first = generate(factory, "t00")
    with factory.begin() as session:
        BillingService(session=session, tenant_id="t00").void_invoice(first)
    results = race(8, lambda _: generate(factory, "t00"))
    assert all(isinstance(r, str) for r in results), results
    assert len(set(results)) == 1
    assert first not in results
    with factory() as session:
        rows = session.execute(select(Invoice.status, Invoice.number).order_by(Invoice.number))
        assert rows.all() == [("void", "INV-000001"), ("open", "INV-000002")]
        created = session.execute(
            select(WebhookEvent).where(WebhookEvent.topic == "billing.invoice.created")
        ).scalars()
        assert len(list(created)) == 2


def test_racing_pay_and_void_leave_one_outcome_and_one_event(factory, race) -> None:
    invoice_id = generate(factory, "t00")

    def change(index: int) -> str:
        with factory.begin() as session:
            service = BillingService(session=session, tenant_id="t00")
            invoice = (service.pay_invoice if index % 2 else service.void_invoice)(invoice_id)
            return invoice.status

    results = race(8, change)
    with factory() as session:
        status = session.execute(select(Invoice.status)).scalar_one()
        changed = (
            session.execute(
                select(WebhookEvent.topic).where(
                    WebhookEvent.topic.in_(["billing.invoice.paid", "billing.invoice.voided"])
                )
            )
            .scalars()
            .all()
        )
    assert changed == [f"billing.invoice.{'paid' if status == 'paid' else 'voided'}"]
    assert all(r == status or isinstance(r, InvoiceStateError) for r in results), results


def test_racing_finalize_jobs_on_one_draft_number_it_once(factory, race) -> None:
    from billing import InvoicePolicy
    from workers.jobs import finalize_invoice_job

    with factory.begin() as session:
        draft = BillingService(
            session=session, tenant_id="t00", policy=InvoicePolicy(grace_period=FEB - JAN)
        ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    results = race(8, lambda _: finalize_invoice_job(factory, {"invoice_id": draft}))
    assert results == ["open"] * 8
    with factory() as session:
        assert session.execute(select(Invoice.number)).scalars().all() == ["INV-000001"]
        finalized = session.execute(
            select(WebhookEvent).where(WebhookEvent.topic == "billing.invoice.finalized")
        ).scalars()
        assert len(list(finalized)) == 1


def test_racing_credit_notes_never_exceed_the_invoice_total(factory, race) -> None:
    from billing import CreditExceedsInvoiceError
    from billing.models import CreditNote

    invoice_id = generate(factory, "t00")  # $10.00

    def credit(_: int) -> str:
        with factory.begin() as session:
            return (
                BillingService(session=session, tenant_id="t00")
                .create_credit_note(invoice_id, amount=300, reason="outage")
                .number
            )

    results = race(8, credit)
    numbers = sorted(r for r in results if isinstance(r, str))
    assert numbers == ["CN-000001", "CN-000002", "CN-000003"]
    assert all(isinstance(r, CreditExceedsInvoiceError) for r in results if r not in numbers)
    with factory() as session:
        amounts = session.execute(select(CreditNote.amount)).scalars().all()
    assert sum(amounts) == 900


def test_usage_recorded_while_its_draft_is_finalized_is_billed_on_it_or_left_late(
    factory, pg_engine, while_held
) -> None:
    """Recording usage locks the draft it re-prices: a finalizer waits for that transaction and
    bills its usage; usage arriving while the finalizer holds the draft finds it finalized."""
    from billing import InvoicePolicy

    grace = InvoicePolicy(grace_period=FEB - JAN)
    with factory.begin() as session:
        draft = BillingService(
            session=session, tenant_id="t00", policy=grace
        ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")

    def finalize(_: int) -> int:
        with factory.begin() as session:
            service = BillingService(session=session, tenant_id="t00", policy=grace)
            return service.finalize_invoice(draft).total_amount

    def use(session, key: str) -> None:
        BillingService(session=session, tenant_id="t00").record_usage(
            metric="tokens", amount=50, at=JAN, idempotency_key=key
        )

    recorder = factory()
    use(recorder, "first")  # holds the draft's row until it commits
    assert while_held(pg_engine, recorder, lambda: finalize(0)) == [1100]  # the fee, 50 tokens

    with factory.begin() as session:
        service = BillingService(session=session, tenant_id="t00", policy=grace)
        service.void_invoice(draft)
        reissued = service.generate_monthly_invoice(
            period_start=JAN, period_end=FEB, currency="usd"
        )
    finalizing = factory()
    BillingService(session=finalizing, tenant_id="t00").finalize_invoice(reissued)
    assert while_held(pg_engine, finalizing, lambda: _commit(factory, use, "second")) == [None]
    with factory() as session:
        invoice = session.get(Invoice, reissued)
        assert (invoice.status, invoice.total_amount) == ("open", 1100)  # "second" is late


def _commit(factory, work, *args) -> None:
    with factory.begin() as session:
        work(session, *args)


def test_a_finalizer_waiting_for_another_finds_the_invoice_finalized_and_takes_no_number(
    factory, pg_engine, while_held
) -> None:
    """The second finalizer waits on the draft's row, then sees it open: one number, no gap."""
    from billing import InvoicePolicy
    from billing.numbering import INVOICE_SEQUENCE, last_number

    grace = InvoicePolicy(grace_period=FEB - JAN)
    with factory.begin() as session:
        draft = BillingService(
            session=session, tenant_id="t00", policy=grace
        ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    first = factory()
    numbers = [BillingService(session=first, tenant_id="t00").finalize_invoice(draft).number]
    numbers += while_held(pg_engine, first, lambda: _finalize_committed(factory, draft))
    assert numbers == ["INV-000001", "INV-000001"]
    with factory() as session:
        assert last_number(session, INVOICE_SEQUENCE) == 1
        lines = session.execute(
            select(InvoiceLine.amount).where(InvoiceLine.invoice_id == draft)
        ).scalars()
        assert (sorted(lines), session.get(Invoice, draft).total_amount) == ([0, 1000], 1000)
        finalized = session.execute(
            select(WebhookEvent).where(WebhookEvent.topic == "billing.invoice.finalized")
        ).scalars()
        assert len(list(finalized)) == 1


def _finalize_committed(factory, invoice_id: str) -> str | None:
    with factory.begin() as session:
        return BillingService(session=session, tenant_id="t00").finalize_invoice(invoice_id).number


def test_a_finalizer_waits_on_another_s_number_only_at_its_own_last_statement(
    factory, pg_engine, while_held
) -> None:
    """The sequence's row is locked from the number to the commit: a second finalizer has
    priced, stored and announced its invoice before it waits, and then takes the next number."""
    with factory.begin() as session:  # the sequence's row, as after the deployment's first number
        session.merge(NumberSequence(name=INVOICE_SEQUENCE, last_value=0))
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if threading.current_thread() is not threading.main_thread():
            sent.append(" ".join(statement.split()[:3]))

    first = factory()
    generate_in(first, TENANTS[0])  # holds the sequence's row until it commits
    waiting_at: list[str] = []
    event.listen(pg_engine, "before_cursor_execute", record)
    try:
        numbers = while_held(
            pg_engine,
            first,
            lambda: generate(factory, TENANTS[1]),
            then=lambda: waiting_at.extend(sent),
        )
    finally:
        event.remove(pg_engine, "before_cursor_execute", record)
    # the invoice with its lines and created event, then the number with the finalized event,
    # last (each event with its deliveries and the notification)
    assert waiting_at[-2:] == ["WITH new_invoice AS", "WITH taken AS"]
    with factory() as session:
        assert session.get(Invoice, numbers[0]).number == "INV-000002"


def generate_in(session, tenant: str) -> str:
    return BillingService(session=session, tenant_id=tenant).generate_monthly_invoice(
        period_start=JAN, period_end=FEB, currency="usd"
    )
