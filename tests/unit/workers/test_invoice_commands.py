"""`billing invoices list/show/finalize/pay/void` and `billing invoice` refusing unended months."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from billing import BillingService
from billing.lifecycle import InvoicePolicy
from billing.models import Invoice, InvoiceLine, Plan, Price, Subscription
from workers.cli import main

JAN = datetime(2025, 1, 1, tzinfo=UTC)
FEB = datetime(2025, 2, 1, tzinfo=UTC)


@pytest.fixture
def cli_factory(sqlite_engine, monkeypatch):
    from billing.db import make_session_factory

    monkeypatch.setenv("DATABASE_URL", sqlite_engine.url.render_as_string(hide_password=False))
    return make_session_factory(sqlite_engine)


@pytest.fixture
def draft(cli_factory) -> str:
    with cli_factory.begin() as session:
        plan = Plan(key="pro", name="Pro")
        session.add(plan)
        session.flush()
        session.add(Price(plan_id=plan.id, key="fee", currency="usd", unit_amount=500))
        session.add(Subscription(tenant_id="acme\x1b[2J", plan_id=plan.id, effective_at=JAN))
        service = BillingService(
            session=session,
            tenant_id="acme\x1b[2J",
            policy=InvoicePolicy(grace_period=FEB - JAN),
        )
        service.record_usage(metric="calls", amount=3, at=JAN, idempotency_key="k")
        return service.generate_monthly_invoice(period_start=JAN, period_end=FEB, currency="usd")


def test_an_invoice_is_finalized_paid_listed_and_shown(cli_factory, draft, capsys) -> None:
    assert main(["invoices", "finalize", draft]) == 0
    assert "INV-000001" in capsys.readouterr().out
    assert main(["invoices", "pay", draft]) == 0
    capsys.readouterr()
    assert main(["invoices", "list", "--status", "paid"]) == 0
    header, _, row = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "number",
        "id",
        "tenant",
        "period_start",
        "period_end",
        "currency",
        "total",
        "status",
    ]
    assert row.split() == [
        "INV-000001",
        draft,
        "acme\\x1b[2J",
        "2025-01-01T00:00:00+00:00",
        "2025-02-01T00:00:00+00:00",
        "USD",
        "500",
        "paid",
    ]
    assert header.index("status") == row.index("paid")
    assert main(["invoices", "list", "--status", "open"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == header.split()  # no rows
    assert main(["invoices", "show", draft]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown
    assert "acme\\x1b[2J" in shown
    assert "  calls " in shown


def test_invoices_list_as_json_filters_by_tenant(cli_factory, draft, capsys) -> None:
    assert main(["invoices", "list", "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row == {
        "number": None,
        "id": draft,
        "tenant": "acme\x1b[2J",
        "period_start": "2025-01-01T00:00:00+00:00",
        "period_end": "2025-02-01T00:00:00+00:00",
        "currency": "USD",
        "total": 500,
        "status": "draft",
    }
    assert main(["invoices", "list", "--tenant", "other", "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_a_refused_change_is_one_line_and_changes_nothing(cli_factory, draft, capsys) -> None:
    assert main(["invoices", "pay", draft]) == 1
    assert capsys.readouterr().err == "billing invoices: a draft invoice cannot become paid\n"
    assert main(["invoices", "void", "00000000-0000-0000-0000-000000000000"]) == 1
    assert "no invoice" in capsys.readouterr().err
    with cli_factory() as session:
        assert session.execute(select(Invoice.status)).scalar_one() == "draft"
        assert len(session.execute(select(InvoiceLine)).all()) == 2


def test_voiding_from_the_command_line(cli_factory, draft, capsys) -> None:
    assert main(["invoices", "void", draft]) == 0
    assert capsys.readouterr().out.rstrip().endswith("void")


def test_invoicing_a_month_that_has_not_ended_is_refused_in_one_line(cli_factory, capsys) -> None:
    assert main(["invoice", "--period", "2099-01"]) == 2
    err = capsys.readouterr().err
    assert err == "billing invoice: 2099-01 has not ended yet (it ends 2099-02-01 00:00 UTC)\n"
    with cli_factory() as session:
        assert session.execute(select(Invoice)).first() is None


def test_crediting_from_the_command_line(cli_factory, draft, capsys) -> None:
    assert main(["invoices", "finalize", draft]) == 0
    assert main(["invoices", "credit", draft, "--amount", "200", "--reason", "outage\x1b[2J"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("CN-000001 ")
    assert main(["invoices", "credit", draft, "--amount", "301", "--reason", "more"]) == 1
    assert capsys.readouterr().err == (
        "billing invoices: the invoice has 300 left to credit, not 301\n"
    )
    assert main(["invoices", "show", draft]) == 0
    assert "credit note CN-000001 -200 outage\\x1b[2J" in capsys.readouterr().out
