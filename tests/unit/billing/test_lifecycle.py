"""Invoice lifecycle: unended periods refused, finalized with a gapless number, paid, voided and
reissued, each change announced once; finalized invoices never change. On SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from billing import (
    BillingService,
    InvalidPeriodError,
    InvoicePolicy,
    InvoiceStateError,
    UnknownInvoiceError,
)
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from webhooks.models import WebhookEvent

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)
MAR = datetime(2025, 3, 1, tzinfo=UTC)
LATER = datetime(2025, 6, 1, tzinfo=UTC)


def seed_plan(session, tenants=("t1", "t2", "t3")) -> Plan:
    """A $10 monthly fee and 2¢ a token, with `tenants` subscribed from January."""
    plan = Plan(key="pro", name="Pro")
    session.add(plan)
    session.flush()
    fee = Price(key="fee", plan_id=plan.id, currency="usd", unit_amount=1000)
    fee.recurring_interval = "month"
    tokens = Price(key="tokens", plan_id=plan.id, currency="usd", metric="tokens", unit_amount=2)
    session.add_all([fee, tokens])
    session.add_all(Subscription(tenant_id=t, plan_id=plan.id, effective_at=JAN) for t in tenants)
    session.flush()
    return plan


@pytest.fixture
def plan(session) -> Plan:
    return seed_plan(session)


def service(session, tenant="t1", now=LATER, **policy) -> BillingService:
    return BillingService(
        session=session, tenant_id=tenant, now=lambda: now, policy=InvoicePolicy(**policy)
    )


def generate(session, tenant="t1", start=JAN, end=FEB, **kwargs) -> Invoice:
    invoice_id = service(session, tenant, **kwargs).generate_monthly_invoice(
        period_start=start, period_end=end, currency="usd"
    )
    return session.get(Invoice, invoice_id)


def events(session, topic=None) -> list[dict]:
    query = select(WebhookEvent).order_by(WebhookEvent.created_at)
    if topic is not None:
        query = query.where(WebhookEvent.topic == topic)
    return [(e.topic, e.payload) for e in session.execute(query).scalars()]


def topics(session) -> list[str]:
    return sorted(topic for topic, _ in events(session))


def lines_of(session, invoice) -> list[tuple]:
    rows = session.execute(select(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id))
    return sorted((line.metric or "", line.quantity, line.amount) for line in rows.scalars())


def test_a_period_that_has_not_ended_is_refused_and_nothing_is_stored(session, plan) -> None:
    with pytest.raises(InvalidPeriodError, match="has not ended"):
        generate(session, now=FEB - timedelta(microseconds=1))
    assert session.execute(select(func.count()).select_from(Invoice)).scalar_one() == 0
    assert events(session) == []


def test_a_period_that_ends_exactly_now_is_invoiced(session, plan) -> None:
    assert generate(session, now=FEB).status == "open"


def test_without_a_grace_period_the_invoice_is_finalized_with_a_number_at_once(
    session, plan
) -> None:
    invoice = generate(session)
    assert (invoice.status, invoice.number, invoice.finalized_at) == ("open", "INV-000001", LATER)
    assert topics(session) == ["billing.invoice.created", "billing.invoice.finalized"]
    [(_, created)] = events(session, "billing.invoice.created")
    assert created == {
        "tenant_id": "t1",
        "invoice_id": invoice.id,
        "period_start": JAN.isoformat(),
        "period_end": FEB.isoformat(),
        "currency": "usd",
    }
    [(_, finalized)] = events(session, "billing.invoice.finalized")
    assert finalized == {
        "tenant_id": "t1",
        "invoice_id": invoice.id,
        "number": "INV-000001",
        "status": "open",
        "period_start": JAN.isoformat(),
        "period_end": FEB.isoformat(),
        "currency": "usd",
        "total_amount": 1000,
    }
    assert generate(session).id == invoice.id  # again: same invoice, no new event
    assert len(events(session)) == 2


def test_numbers_are_gapless_across_tenants_and_periods_with_the_deployment_prefix(
    session, plan
) -> None:
    numbers = [
        generate(session, tenant, start, end, number_prefix="ACME-").number
        for tenant, start, end in [("t1", JAN, FEB), ("t2", JAN, FEB), ("t1", FEB, MAR)]
    ]
    assert numbers == ["ACME-000001", "ACME-000002", "ACME-000003"]
    assert topics(session).count("billing.invoice.created") == 3  # each its own event


def test_a_rolled_back_finalization_leaves_no_gap(session_factory, plan_committed) -> None:
    with session_factory() as session:
        assert generate(session, "t1").number == "INV-000001"
        session.rollback()
    with session_factory.begin() as session:
        assert generate(session, "t2").number == "INV-000001"
        assert generate(session, "t3").number == "INV-000002"


@pytest.fixture
def plan_committed(session_factory) -> None:
    with session_factory.begin() as session:
        seed_plan(session)


def test_a_change_reads_the_invoice_as_stored_not_as_the_session_last_saw_it(
    session_factory, plan_committed
) -> None:
    with session_factory.begin() as session:
        invoice_id = generate(session).id
    with session_factory() as stale:  # its objects outlive a commit (expire_on_commit off)
        seen = service(stale).get_invoice(invoice_id)
        stale.commit()
        with session_factory.begin() as other:  # another process pays it meanwhile
            service(other, now=LATER + timedelta(days=1)).pay_invoice(invoice_id)
        paid = service(stale, now=LATER + timedelta(days=2)).pay_invoice(invoice_id)
        assert paid is seen
        assert (paid.status, paid.paid_at) == ("paid", LATER + timedelta(days=1))
        stale.commit()
    with session_factory() as session:
        assert session.get(Invoice, invoice_id).paid_at == LATER + timedelta(days=1)


def test_with_a_grace_period_the_invoice_is_a_draft_without_a_number(session, plan) -> None:
    invoice = generate(session, grace_period=timedelta(days=3))
    assert (invoice.status, invoice.number) == ("draft", None)
    assert topics(session) == ["billing.invoice.created"]
    finalized = service(session).finalize_invoice(invoice.id)
    assert (finalized.status, finalized.number) == ("open", "INV-000001")
    service(session).finalize_invoice(invoice.id)  # twice: nothing new
    assert topics(session) == ["billing.invoice.created", "billing.invoice.finalized"]


def test_paying_an_open_invoice_once(session, plan) -> None:
    invoice = generate(session)
    paid = service(session, now=LATER + timedelta(days=1)).pay_invoice(invoice.id)
    assert (paid.status, paid.paid_at) == ("paid", LATER + timedelta(days=1))
    service(session).pay_invoice(invoice.id)
    [(_, event)] = events(session, "billing.invoice.paid")
    assert (event["status"], event["number"]) == ("paid", "INV-000001")
    with pytest.raises(InvoiceStateError, match="paid invoice cannot become void"):
        service(session).void_invoice(invoice.id)
    assert session.get(Invoice, invoice.id).status == "paid"


def test_an_uncollectible_invoice_can_still_be_paid(session, plan) -> None:
    invoice = generate(session)
    assert service(session).mark_uncollectible(invoice.id).status == "uncollectible"
    assert service(session).pay_invoice(invoice.id).status == "paid"
    assert topics(session) == [
        "billing.invoice.created",
        "billing.invoice.finalized",
        "billing.invoice.marked_uncollectible",
        "billing.invoice.paid",
    ]


@pytest.mark.parametrize(
    ("prepare", "change"),
    [
        ("draft", "pay_invoice"),
        ("draft", "mark_uncollectible"),
        ("void", "pay_invoice"),
        ("void", "finalize_invoice"),
        ("paid", "mark_uncollectible"),
        ("paid", "finalize_invoice"),
    ],
)
def test_forbidden_transitions_change_nothing(session, plan, prepare, change) -> None:
    invoice = generate(session, grace_period=timedelta(days=1))
    if prepare == "void":
        service(session).void_invoice(invoice.id)
    if prepare == "paid":
        service(session).finalize_invoice(invoice.id)
        service(session).pay_invoice(invoice.id)
    before = (invoice.status, invoice.number, len(events(session)))
    with pytest.raises(InvoiceStateError) as raised:
        getattr(service(session), change)(invoice.id)
    assert (raised.value.invoice_id, raised.value.status) == (invoice.id, prepare)
    session.expire_all()
    after = session.get(Invoice, invoice.id)
    assert (after.status, after.number, len(events(session))) == before


def test_each_event_has_the_stable_id_of_its_invoice_and_change(session, plan) -> None:
    invoice = generate(session)
    service(session).pay_invoice(invoice.id)
    ids = sorted(session.scalars(select(WebhookEvent.id)))
    assert ids == [f"invoice_{name}_{invoice.id}" for name in ("created", "finalized", "paid")]


def test_each_change_of_state_is_logged_once(session, plan, caplog) -> None:
    caplog.set_level(logging.INFO, logger="billing.service")
    invoice = generate(session)
    service(session).pay_invoice(invoice.id)
    service(session).pay_invoice(invoice.id)  # paid already: nothing to log
    changes = [
        r.getMessage() for r in caplog.records if r.getMessage().endswith((" open", " paid"))
    ]
    assert changes == [f"invoice {invoice.id} is open", f"invoice {invoice.id} is paid"]


def test_another_tenant_s_invoice_is_unknown(session, plan) -> None:
    invoice = generate(session, "t1")
    for change in ("pay_invoice", "void_invoice", "finalize_invoice", "get_invoice"):
        with pytest.raises(UnknownInvoiceError, match=f"no invoice '{invoice.id}' for this tenant"):
            getattr(service(session, "t2"), change)(invoice.id)
    assert session.get(Invoice, invoice.id).status == "open"


def test_voiding_frees_the_period_for_a_new_invoice_from_the_usage_known_then(
    session, plan
) -> None:
    first = generate(session)
    service(session).record_usage(
        metric="tokens", amount=50, at=JAN + timedelta(days=3), idempotency_key="late"
    )
    assert generate(session).id == first.id  # still held by the open invoice
    voided = service(session).void_invoice(first.id)
    assert (voided.status, voided.voided_at) == ("void", LATER)
    again = generate(session)
    assert again.id != first.id
    assert (again.status, again.number, again.total_amount) == ("open", "INV-000002", 1100)
    assert (first.status, first.number, first.total_amount) == ("void", "INV-000001", 1000)
    assert [topic for topic, _ in events(session)].count("billing.invoice.voided") == 1


def test_a_finalized_invoice_never_changes_when_usage_arrives_late(session, plan) -> None:
    invoice = generate(session)
    before = (invoice.total_amount, lines_of(session, invoice))
    service(session).record_usage(
        metric="tokens", amount=70, at=JAN + timedelta(days=9), idempotency_key="late"
    )
    for policy in ({}, {"grace_period": timedelta(days=3)}):
        assert generate(session, **policy).id == invoice.id
    session.expire_all()
    again = session.get(Invoice, invoice.id)
    assert (again.total_amount, lines_of(session, again)) == before


@pytest.mark.parametrize("change", ["pay_invoice", "mark_uncollectible"])
def test_generating_again_after_a_payment_or_write_off_returns_the_invoice_as_it_is(
    session, plan, change
) -> None:
    invoice = generate(session)
    getattr(service(session), change)(invoice.id)
    before = (invoice.status, invoice.total_amount, lines_of(session, invoice))
    assert generate(session).id == invoice.id  # a retried invoice job, a re-run of the month
    session.refresh(invoice)
    assert (invoice.status, invoice.total_amount, lines_of(session, invoice)) == before
    assert topics(session).count("billing.invoice.finalized") == 1


def test_the_invoice_finalize_returns_shows_when_it_was_finalized(session, plan) -> None:
    """The numbering statement writes `finalized_at` into the row; the object returned (the
    session's) shows it too, without a refresh."""
    draft = generate(session, grace_period=timedelta(days=3))
    finalized = service(session, now=LATER + timedelta(days=3)).finalize_invoice(draft.id)
    assert (finalized.status, finalized.finalized_at) == ("open", LATER + timedelta(days=3))


class RecordingOutbox:
    """An outbox that keeps what it is given and stores nothing in `webhook_events`."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str | None]] = []

    def publish(self, session, topic, payload, *, event_id=None, **options) -> str:
        self.published.append((topic, event_id))
        return event_id or "recorded"


def test_through_another_outbox_the_sql_outbox_stores_none_of_the_invoice_s_events(
    session, plan
) -> None:
    outbox = RecordingOutbox()
    invoice_id = BillingService(
        session=session, tenant_id="t1", now=lambda: LATER, outbox=outbox
    ).generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    assert outbox.published == [
        ("billing.invoice.created", f"invoice_created_{invoice_id}"),
        ("billing.invoice.finalized", f"invoice_finalized_{invoice_id}"),
    ]
    assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
    assert session.get(Invoice, invoice_id).number == "INV-000001"
