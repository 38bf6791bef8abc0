"""Invoices: a tenant lists and reads its own (`billing.read`); an operator (`billing.admin`)
lists and reads any tenant's (`/tenants/{tenant_id}/invoices`) and voids, pays, finalizes
or marks any invoice uncollectible (each change and its event in one transaction).

An invoice's lines come a page at a time (an invoice can have thousands): `GET` of an invoice
holds the first `LINES_PER_DETAIL` and `next_lines_cursor`; `/lines` walks the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import credit_notes
from billing.api.auth import Operator, Reader
from billing.api.deps import ApiDep, BillingApi, SessionDep
from billing.api.pagination import keyset_page
from billing.api.problems import ProblemError, problem_responses
from billing.api.schemas import (
    CreditNoteIn,
    CreditNoteLineOut,
    CreditNoteOut,
    InvoiceDetail,
    InvoiceLineOut,
    InvoiceLinePage,
    InvoiceOut,
    InvoicePage,
    InvoicePreviewOut,
    ResourceId,
    TenantId,
)
from billing.models import CreditNote, Invoice, InvoiceLine
from billing.service import BillingService

router = APIRouter(tags=["invoices"])

LINES_PER_DETAIL = 100
InvoiceId = Annotated[str, Path(max_length=36, pattern=ResourceId)]
TenantPath = Annotated[TenantId, Path()]
Limit = Annotated[int, Query(ge=1, le=1000)]
Cursor = Annotated[str | None, Query(max_length=1000)]
Currency = Annotated[str, Query(min_length=1, max_length=16)]
READ_ERRORS = problem_responses(401, 403, 404, 422)


@router.get(
    "/invoices", summary="The caller's invoices", responses=problem_responses(401, 403, 422)
)
def list_invoices(
    principal: Reader, session: SessionDep, limit: Limit = 100, cursor: Cursor = None
) -> InvoicePage:
    """Ordered by period start, then id; walking `next_cursor` returns each invoice once."""
    return _page(session, principal.tenant_id, limit, cursor)


@router.get(
    "/tenants/{tenant_id}/invoices",
    summary="A tenant's invoices (operator)",
    responses=problem_responses(401, 403, 422),
)
def list_tenant_invoices(
    tenant_id: TenantPath,
    principal: Operator,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> InvoicePage:
    """As `GET /invoices`, for the tenant in the path."""
    return _page(session, tenant_id, limit, cursor)


@router.get(
    "/invoices/upcoming",
    summary="The caller's invoice of the current period so far (a preview)",
    responses=READ_ERRORS,
)
def upcoming_invoice(
    principal: Reader, session: SessionDep, api: ApiDep, currency: Currency
) -> InvoicePreviewOut:
    """The lines and total the invoice of the tenant's month containing now (in its time zone,
    UTC by default) would have with the usage known now; stores nothing. 422 for a malformed
    currency or one the tenant's plans have no price in."""
    return _upcoming(session, principal.tenant_id, api, currency)


@router.get(
    "/tenants/{tenant_id}/invoices/upcoming",
    summary="A tenant's invoice of the current period so far (operator)",
    responses=READ_ERRORS,
)
def upcoming_tenant_invoice(
    tenant_id: TenantPath, principal: Operator, session: SessionDep, api: ApiDep, currency: Currency
) -> InvoicePreviewOut:
    """As `GET /invoices/upcoming`, for the tenant in the path."""
    return _upcoming(session, tenant_id, api, currency)


def _upcoming(
    session: Session, tenant_id: str, api: BillingApi, currency: str
) -> InvoicePreviewOut:
    service = BillingService(
        session=session, tenant_id=tenant_id, now=api.clock, policy=api.policy()
    )
    upcoming = service.preview_upcoming_invoice(currency=currency)
    return InvoicePreviewOut.model_validate(upcoming, from_attributes=True)


@router.get(
    "/invoices/{invoice_id}",
    summary="One of the caller's invoices, with its first lines",
    responses=READ_ERRORS,
)
def get_invoice(invoice_id: InvoiceId, principal: Reader, session: SessionDep) -> InvoiceDetail:
    """404 for an invoice of another tenant, as for one that does not exist."""
    return invoice_detail(session, _find_invoice(session, invoice_id, principal.tenant_id))


@router.get(
    "/tenants/{tenant_id}/invoices/{invoice_id}",
    summary="One of a tenant's invoices, with its first lines (operator)",
    responses=READ_ERRORS,
)
def get_tenant_invoice(
    tenant_id: TenantPath, invoice_id: InvoiceId, principal: Operator, session: SessionDep
) -> InvoiceDetail:
    """404 for an invoice of another tenant, as for one that does not exist."""
    return invoice_detail(session, _find_invoice(session, invoice_id, tenant_id))


@router.get(
    "/invoices/{invoice_id}/lines",
    summary="The lines of one of the caller's invoices, a page at a time",
    responses=READ_ERRORS,
)
def list_invoice_lines(
    invoice_id: InvoiceId,
    principal: Reader,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> InvoiceLinePage:
    """Lines in a stable order; walking `next_cursor` returns each line once."""
    invoice = _find_invoice(session, invoice_id, principal.tenant_id)
    return _lines(session, invoice.id, limit, cursor)


@router.get(
    "/tenants/{tenant_id}/invoices/{invoice_id}/lines",
    summary="The lines of one of a tenant's invoices, a page at a time (operator)",
    responses=READ_ERRORS,
)
def list_tenant_invoice_lines(
    tenant_id: TenantPath,
    invoice_id: InvoiceId,
    principal: Operator,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> InvoiceLinePage:
    """As `GET /invoices/{invoice_id}/lines`, for the tenant in the path."""
    invoice = _find_invoice(session, invoice_id, tenant_id)
    return _lines(session, invoice.id, limit, cursor)


@router.post(
    "/invoices/{invoice_id}/void",
    summary="Void a tenant's invoice (operator)",
    responses=problem_responses(401, 403, 404, 409, 413, 415, 422),
)
def void_invoice(
    invoice_id: InvoiceId, principal: Operator, session: SessionDep, api: ApiDep
) -> InvoiceOut:
    """A draft, open or uncollectible invoice becomes void, and its period may be invoiced
    anew; voiding again changes nothing; a paid invoice cannot be voided: 409."""
    return _transition(session, api, invoice_id, BillingService.void_invoice)


@router.post(
    "/invoices/{invoice_id}/finalize",
    summary="Finalize a tenant's draft invoice now (operator)",
    responses=problem_responses(401, 403, 404, 409, 422),
)
def finalize_invoice(
    invoice_id: InvoiceId, principal: Operator, session: SessionDep, api: ApiDep
) -> InvoiceOut:
    """A draft is re-priced from its period's usage and numbered (`billing.invoice.finalized`);
    an open invoice is returned as it is; a paid, void or uncollectible one: 409."""
    return _transition(session, api, invoice_id, BillingService.finalize_invoice)


@router.post(
    "/invoices/{invoice_id}/credit-notes",
    status_code=201,
    summary="Credit a tenant's open or paid invoice (operator)",
    responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422),
)
def create_credit_note(
    invoice_id: InvoiceId,
    body: CreditNoteIn,
    principal: Operator,
    session: SessionDep,
    api: ApiDep,
) -> CreditNoteOut:
    """A credit note numbered `CN-…` (`billing.credit_note.created`); 409 when the invoice is
    not open or paid, or when its credit notes would exceed its total."""
    tenant_id = _find_invoice(session, invoice_id).tenant_id
    service = BillingService(
        session=session, tenant_id=tenant_id, now=api.clock, policy=api.policy()
    )
    note = service.create_credit_note(
        invoice_id,
        amount=body.amount,
        lines=None if body.lines is None else [line.model_dump() for line in body.lines],
        reason=body.reason,
    )
    session.commit()
    return credit_note_out(note)


@router.post(
    "/invoices/{invoice_id}/pay",
    summary="Mark a tenant's invoice paid (operator)",
    responses=problem_responses(401, 403, 404, 409, 422),
)
def pay_invoice(
    invoice_id: InvoiceId, principal: Operator, session: SessionDep, api: ApiDep
) -> InvoiceOut:
    """An open or uncollectible invoice becomes paid (`paid_at` set); paying again changes
    nothing; a draft or void invoice cannot be paid: 409."""
    return _transition(session, api, invoice_id, BillingService.pay_invoice)


@router.post(
    "/invoices/{invoice_id}/mark-uncollectible",
    summary="Mark a tenant's open invoice uncollectible (operator)",
    responses=problem_responses(401, 403, 404, 409, 422),
)
def mark_uncollectible(
    invoice_id: InvoiceId, principal: Operator, session: SessionDep, api: ApiDep
) -> InvoiceOut:
    """An open invoice becomes uncollectible (it can still be paid later); 409 otherwise."""
    return _transition(session, api, invoice_id, BillingService.mark_uncollectible)


def _transition(
    session: Session,
    api: BillingApi,
    invoice_id: str,
    change: Callable[[BillingService, str], Invoice],
) -> InvoiceOut:
    """Apply a state change and its event, in the invoice's tenant, in one transaction."""
    tenant_id = _find_invoice(session, invoice_id).tenant_id
    service = BillingService(
        session=session, tenant_id=tenant_id, now=api.clock, policy=api.policy()
    )
    invoice = change(service, invoice_id)
    session.commit()
    return invoice_out(invoice)


def invoice_out(invoice: Invoice) -> InvoiceOut:
    """The API form of an invoice (without lines)."""
    return InvoiceOut(
        id=invoice.id,
        tenant_id=invoice.tenant_id,
        period_start=invoice.period_start,
        period_end=invoice.period_end,
        status=invoice.status,
        total_amount=invoice.total_amount,
        currency=invoice.currency,
        provider_invoice_id=invoice.provider_invoice_id,
        created_at=invoice.created_at,
        number=invoice.number,
        finalized_at=invoice.finalized_at,
        paid_at=invoice.paid_at,
        voided_at=invoice.voided_at,
    )


def invoice_detail(session: Session, invoice: Invoice) -> InvoiceDetail:
    """The API form of an invoice with its first `LINES_PER_DETAIL` lines and credit notes."""
    lines = _lines(session, invoice.id, LINES_PER_DETAIL, None)
    return InvoiceDetail(
        **invoice_out(invoice).model_dump(),
        lines=lines.items,
        next_lines_cursor=lines.next_cursor,
        credit_notes=[credit_note_out(n) for n in credit_notes.of_invoice(session, invoice.id)],
    )


def credit_note_out(note: CreditNote) -> CreditNoteOut:
    """The API form of a credit note."""
    return CreditNoteOut(
        id=note.id,
        invoice_id=note.invoice_id,
        number=note.number,
        amount=note.amount,
        currency=note.currency,
        reason=note.reason,
        created_at=note.created_at,
        lines=[
            CreditNoteLineOut(
                invoice_line_id=line.invoice_line_id,
                description=line.description,
                amount=line.amount,
            )
            for line in note.lines
        ],
    )


def _page(session: Session, tenant_id: str, limit: int, cursor: str | None) -> InvoicePage:
    query = select(Invoice).where(Invoice.tenant_id == tenant_id)
    order = (Invoice.period_start, Invoice.id)
    rows, next_cursor = keyset_page(session, query, order, limit, cursor)
    return InvoicePage(items=[invoice_out(i) for i in rows], next_cursor=next_cursor)


def _lines(session: Session, invoice_id: str, limit: int, cursor: str | None) -> InvoiceLinePage:
    query = select(InvoiceLine).where(InvoiceLine.invoice_id == invoice_id)
    order = (InvoiceLine.created_at, InvoiceLine.id)
    rows, next_cursor = keyset_page(session, query, order, limit, cursor)
    items = [
        InvoiceLineOut(
            id=line.id,
            price_id=line.price_id,
            metric=line.metric,
            quantity=line.quantity,
            amount=line.amount,
            dimensions=line.dimensions,
        )
        for line in rows
    ]
    return InvoiceLinePage(items=items, next_cursor=next_cursor)


def _find_invoice(session: Session, invoice_id: str, tenant_id: str | None = None) -> Invoice:
    """The invoice, of `tenant_id` when given (None: an operator's lookup, any tenant)."""
    query = select(Invoice).where(Invoice.id == invoice_id)
    if tenant_id is not None:
        query = query.where(Invoice.tenant_id == tenant_id)
    invoice = session.execute(query).scalar_one_or_none()
    if invoice is None:
        raise ProblemError(404, "Not found", "no such invoice", slug="not-found")
    return invoice
