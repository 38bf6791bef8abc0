"""`billing invoices`: list, show and move invoices through their lifecycle (operators).

`list [--tenant T] [--status S] [--json]` (a table, or one JSON object per invoice),
`show ID` (lines, credit notes), `finalize ID`, `pay ID`, `void ID`, `mark-uncollectible ID` and
`credit ID --amount N --reason TEXT`. Each change runs
`BillingService` in one transaction, with its event. A refused change (`InvoiceStateError`, a
credit over the total) or an unknown id prints one line on stderr, exit 1.
Stored text (tenant ids, metric names) is printed escaped: it came from API callers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from billing import BillingService, credit_notes
from billing.db import make_engine, make_session_factory
from billing.dimensions import describe
from billing.errors import (
    CreditExceedsInvoiceError,
    InvalidCreditNoteError,
    InvoiceStateError,
    UnknownInvoiceError,
)
from billing.lifecycle import InvoicePolicy
from billing.models import INVOICE_STATUSES, Invoice, InvoiceLine
from billing.settings import BillingSettings
from webhooks.output import print_rows
from webhooks.safetext import safe_text

Change = Callable[[BillingService, str], Invoice]

_CHANGES: dict[str, tuple[str, Change]] = {
    "finalize": ("draft → open: number it (no-op when open)", BillingService.finalize_invoice),
    "pay": ("open or uncollectible → paid", BillingService.pay_invoice),
    "void": ("draft, open or uncollectible → void", BillingService.void_invoice),
    "mark-uncollectible": ("open → uncollectible", BillingService.mark_uncollectible),
}


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `billing invoices …` to the command line."""
    invoices = commands.add_parser("invoices", help="list, show, finalize, pay or void invoices")
    sub = invoices.add_subparsers(dest="invoices_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="invoices, newest period first (a table; --json)")
    listing.add_argument("--tenant", help="only this tenant")
    listing.add_argument("--status", choices=INVOICE_STATUSES, help="only this status")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_list)
    show = sub.add_parser("show", help="one invoice with its lines")
    show.add_argument("invoice_id", metavar="ID")
    show.set_defaults(handler=_show)
    credit = sub.add_parser("credit", help="credit an open or paid invoice (a CN- credit note)")
    credit.add_argument("invoice_id", metavar="ID")
    credit.add_argument("--amount", type=int, required=True, help="in the minor unit (cents)")
    credit.add_argument("--reason", required=True)
    credit.set_defaults(handler=_credit)
    for name, (help_text, change) in _CHANGES.items():
        command = sub.add_parser(name, help=help_text)
        command.add_argument("invoice_id", metavar="ID")
        command.set_defaults(handler=_changer(change))


def format_invoice(invoice: Invoice) -> str:
    """One line: number (or `-`), id, tenant, period, currency, total, status."""
    return (
        f"{invoice.number or '-':<12} {invoice.id} {safe_text(invoice.tenant_id)} "
        f"{invoice.period_start:%Y-%m-%d}..{invoice.period_end:%Y-%m-%d} "
        f"{invoice.currency.upper()} {invoice.total_amount} {invoice.status}"
    )


def _factory() -> tuple[sessionmaker[Session], InvoicePolicy]:
    settings = BillingSettings()
    engine = make_engine(settings.database_url, echo=settings.sql_echo)
    return make_session_factory(engine), settings.invoice_policy()


def _list(args: argparse.Namespace) -> int:
    session_factory, _ = _factory()
    query = select(Invoice).order_by(Invoice.period_start.desc(), Invoice.created_at.desc())
    if args.tenant:
        query = query.where(Invoice.tenant_id == args.tenant)
    if args.status:
        query = query.where(Invoice.status == args.status)
    with session_factory() as session:
        rows = [_row(invoice) for invoice in session.execute(query.limit(args.limit)).scalars()]
    print_rows(COLUMNS, rows, as_json=args.json)
    return 0


COLUMNS = ["number", "id", "tenant", "period_start", "period_end", "currency", "total", "status"]


def _row(invoice: Invoice) -> dict[str, object]:
    return {
        "number": invoice.number,
        "id": invoice.id,
        "tenant": invoice.tenant_id,
        "period_start": invoice.period_start,
        "period_end": invoice.period_end,
        "currency": invoice.currency.upper(),
        "total": invoice.total_amount,
        "status": invoice.status,
    }


def _show(args: argparse.Namespace) -> int:
    session_factory, _ = _factory()
    with session_factory() as session:
        invoice = session.get(Invoice, args.invoice_id)
        if invoice is None:
            print(f"billing invoices: no invoice {safe_text(args.invoice_id)}", file=sys.stderr)
            return 1
        print(format_invoice(invoice))
        lines = session.execute(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_id == invoice.id)
            .order_by(InvoiceLine.created_at, InvoiceLine.id)
        ).scalars()
        for line in lines:
            label = safe_text(describe(line.metric, line.dimensions))
            print(f"  {label:<24} {line.quantity:>14} {line.amount:>12}")
        for note in credit_notes.of_invoice(session, invoice.id):
            print(f"  credit note {note.number} -{note.amount} {safe_text(note.reason)}")
    return 0


def _credit(args: argparse.Namespace) -> int:
    session_factory, policy = _factory()
    try:
        with session_factory.begin() as session:
            service = BillingService(
                session=session, tenant_id=_tenant_of(session, args.invoice_id), policy=policy
            )
            note = service.create_credit_note(
                args.invoice_id, amount=args.amount, reason=args.reason
            )
            print(f"{note.number} {note.id} {note.currency.upper()} {note.amount}")
    except (
        InvoiceStateError,
        UnknownInvoiceError,
        CreditExceedsInvoiceError,
        InvalidCreditNoteError,
    ) as error:
        print(f"billing invoices: {safe_text(error)}", file=sys.stderr)
        return 1
    return 0


def _tenant_of(session: Session, invoice_id: str) -> str:
    tenant_id = session.execute(
        select(Invoice.tenant_id).where(Invoice.id == invoice_id)
    ).scalar_one_or_none()
    if tenant_id is None:
        raise UnknownInvoiceError(f"no invoice {safe_text(invoice_id)}")
    return tenant_id


def _changer(change: Change) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        session_factory, policy = _factory()
        try:
            with session_factory.begin() as session:
                tenant_id = _tenant_of(session, args.invoice_id)
                service = BillingService(session=session, tenant_id=tenant_id, policy=policy)
                invoice = change(service, args.invoice_id)
                print(format_invoice(invoice))
        except (InvoiceStateError, UnknownInvoiceError) as error:
            print(f"billing invoices: {error}", file=sys.stderr)
            return 1
        return 0

    return run
