"""An invoice in a fixed number of statements: one SELECT for the subscriptions and their
prices, one for the metrics used and their meters, one GROUP BY for every metric's usage, one
INSERT for all the lines, the new invoice finalized without being read again and numbered
last. On PostgreSQL the invoice, its lines and its created event are one statement, and the
number with the finalized event another."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import delete, func, select

from billing import BillingService
from billing.invoicing import store_invoice
from billing.models import Invoice, NumberSequence, Price
from billing.numbering import INVOICE_SEQUENCE
from webhooks.models import WebhookSubscription

from .test_invoicing import FEB, JAN, lines_of, make_plan, subscribe, use

PRICES = [
    {"unit_amount": 2900, "recurring_interval": "month"},
    {"metric": "tokens", "unit_amount_decimal": Decimal("0.0002")},
    {"metric": "calls", "unit_amount": 1},
]


@pytest.fixture
def tenant(session) -> None:
    plan = make_plan(session, prices=PRICES)
    subscribe(session, "t1", plan)
    for metric, amount in (("tokens", 100_000), ("calls", 10), ("unpriced", 7)):
        use(session, "t1", metric, amount, JAN + timedelta(days=3))
    for topic in ("billing.invoice.created", "billing.invoice.finalized"):
        session.add(WebhookSubscription(topic=topic, url="https://e.test/h", secret="whsec_eA=="))
    session.execute(delete(NumberSequence))  # its row made here, not on the first number taken
    session.add(NumberSequence(name=INVOICE_SEQUENCE, last_value=0))
    session.flush()


def generate(session) -> str:
    service = BillingService(session=session, tenant_id="t1")
    return service.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")


def test_an_invoice_is_priced_stored_and_announced_in_a_fixed_number_of_statements(
    session, engine, tenant, statements
) -> None:
    invoice_id = generate(session)
    on_postgresql = engine.dialect.name == "postgresql"
    announced = (  # PostgreSQL: the event, its deliveries and the notification at once
        ["WITH published_events AS"]
        if on_postgresql
        else ["SELECT webhook_subscriptions.id FROM", "INSERT INTO webhook_events"]
        + ["INSERT INTO webhook_deliveries"]
    )
    notified = [s for s in statements if s.startswith("SELECT pg_notify")]
    assert not notified  # PostgreSQL: in the statement that writes the deliveries
    sent = [s for s in statements if s not in notified]
    assert sent.count("SELECT subscriptions.id, subscriptions.effective_at,") == 1  # with prices
    assert not any(s.startswith("SELECT prices") for s in sent)
    assert sent.count("SELECT tenants.timezone FROM") == 1  # for the period and both events
    numbered = (  # last: the sequence's row stays locked until the commit
        ["WITH taken AS"]  # sequence, invoice and finalized event in one statement
        if on_postgresql
        else [
            *announced,  # billing.invoice.finalized
            "UPDATE number_sequences SET",
            "UPDATE invoices SET",
            "UPDATE webhook_events SET",
        ]
    )
    stored = (  # the invoice, all its lines and billing.invoice.created
        ["WITH new_invoice AS"]  # in one statement
        if on_postgresql
        else ["INSERT INTO invoices", "INSERT INTO invoice_lines", *announced]
    )
    after_insert = sent[sent.index(stored[0]) :]
    # finalized at once: the new row is ours, no SELECT … FOR UPDATE
    assert after_insert == [*stored, *numbered]  # with the status: the row is updated once
    priced = sent.index("SELECT subscriptions.id, subscriptions.effective_at,")
    usage = sent[priced + 1 : sent.index(stored[0])]
    assert len(usage) == 2  # the metrics used, with their meters; one GROUP BY for all three
    # No SELECT for the invoice first (the INSERT's ON CONFLICT covers it): one SELECT of
    # invoices, the tenant's finalized ones that late usage may adjust.
    assert sent.count("SELECT invoices.id, invoices.tenant_id,") == 1
    assert len(sent) == (8 if on_postgresql else 16)  # PostgreSQL: the advisory lock, and
    # the writes in two statements
    invoice = session.get(Invoice, invoice_id)
    assert (invoice.status, invoice.number, invoice.total_amount) == ("open", "INV-000001", 2930)
    assert lines_of(session, invoice) == [
        ("", 1, 2900, False),
        ("calls", 10, 10, False),
        ("tokens", 100_000, 20, False),
        ("unpriced", 7, 0, True),
    ]


def test_generating_again_prices_and_finds_the_invoice_and_creates_nothing(
    session, tenant, statements
) -> None:
    first = generate(session)
    statements.clear()
    assert generate(session) == first
    assert "INSERT INTO invoice_lines" not in statements
    assert not any(s.startswith("INSERT INTO webhook_events") for s in statements)
    assert session.scalars(select(Invoice.id)).all() == [first]


def test_an_invoiced_period_whose_plan_left_the_currency_is_found_not_refused(
    session, tenant
) -> None:
    first = generate(session)
    for price in session.scalars(select(Price)):
        price.currency = "eur"
    session.flush()
    assert generate(session) == first


def test_the_insert_finds_its_unique_index_when_prepared_and_planned_generically(
    session, engine
) -> None:
    """psycopg prepares a statement run 5 times on a connection, and PostgreSQL then plans it
    generically: the partial index's `status <> 'void'` must not be a bound parameter, or
    ON CONFLICT cannot infer the index (`InvalidColumnReference`) on every later invoice."""
    plan = make_plan(session, prices=PRICES[:1])
    for n in range(15):
        subscribe(session, f"g{n}", plan)
        service = BillingService(session=session, tenant_id=f"g{n}")
        service.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")
    assert session.scalar(select(func.count()).select_from(Invoice)) == 15


def test_a_stored_invoice_s_object_has_every_column_without_reading_the_row_back(
    session, tenant, statements
) -> None:
    invoice = store_invoice(session, "t1", JAN, FEB, "usd", [])
    statements.clear()
    columns = [column.key for column in Invoice.__table__.columns]
    made = {name: getattr(invoice, name) for name in columns}
    assert statements == []  # every column set: nothing loaded on access
    session.expire(invoice)
    assert {name: getattr(invoice, name) for name in columns} == made  # as the row stores it
    assert (made["status"], made["number"], made["total_amount"]) == ("draft", None, 0)
