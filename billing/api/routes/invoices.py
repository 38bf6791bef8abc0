"""Invoices: a tenant lists and reads its own (`billing.read`); an operator (`billing.admin`)
lists and reads any tenant's (`/tenants/{tenant_id}/invoices`) and voids any invoice."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import literal, select, tuple_
from sqlalchemy.orm import Session, selectinload

from billing.api.auth import Operator, Reader
from billing.api.deps import SessionDep
from billing.api.pagination import decode_cursor, encode_cursor, invalid_cursor
from billing.api.problems import ProblemError, problem_responses
from billing.api.schemas import (
    InvoiceDetail,
    InvoiceLineOut,
    InvoiceOut,
    InvoicePage,
    ResourceId,
    TenantId,
)
from billing.models import Invoice
from webhooks.sqltypes import UTCDateTime

router = APIRouter(tags=["invoices"])

InvoiceId = Annotated[str, Path(max_length=36, pattern=ResourceId)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Cursor = Annotated[str | None, Query(max_length=1000)]


@router.get(
    "/invoices", summary="The caller's invoices", responses=problem_responses(401, 403, 422)
)
def list_invoices(
    principal: Reader,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> InvoicePage:
    """Ordered by period start, then id; walking `next_cursor` returns each invoice once."""
    return _page(session, principal.tenant_id, limit, cursor)


@router.get(
    "/tenants/{tenant_id}/invoices",
    summary="A tenant's invoices (operator)",
    responses=problem_responses(401, 403, 422),
)
def list_tenant_invoices(
    tenant_id: Annotated[TenantId, Path()],
    principal: Operator,
    session: SessionDep,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> InvoicePage:
    """As `GET /invoices`, for the tenant in the path."""
    return _page(session, tenant_id, limit, cursor)


@router.get(
    "/invoices/{invoice_id}",
    summary="One of the caller's invoices, with its lines",
    responses=problem_responses(401, 403, 404, 422),
)
def get_invoice(
    invoice_id: InvoiceId,
    principal: Reader,
    session: SessionDep,
) -> InvoiceDetail:
    """404 for an invoice of another tenant, as for one that does not exist."""
    return invoice_detail(_find_invoice(session, invoice_id, principal.tenant_id))


@router.get(
    "/tenants/{tenant_id}/invoices/{invoice_id}",
    summary="One of a tenant's invoices, with its lines (operator)",
    responses=problem_responses(401, 403, 404, 422),
)
def get_tenant_invoice(
    tenant_id: Annotated[TenantId, Path()],
    invoice_id: InvoiceId,
    principal: Operator,
    session: SessionDep,
) -> InvoiceDetail:
    """404 for an invoice of another tenant, as for one that does not exist."""
    return invoice_detail(_find_invoice(session, invoice_id, tenant_id))


def _page(session: Session, tenant_id: str, limit: int, cursor: str | None) -> InvoicePage:
    query = select(Invoice).where(Invoice.tenant_id == tenant_id)
    if cursor is not None:
        query = query.where(
            tuple_(Invoice.period_start, Invoice.id) > tuple_(*_position(decode_cursor(cursor, 2)))
        )
    rows = list(
        session.execute(query.order_by(Invoice.period_start, Invoice.id).limit(limit + 1)).scalars()
    )
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last.period_start.isoformat(), last.id)
    return InvoicePage(items=[invoice_out(i) for i in rows[:limit]], next_cursor=next_cursor)


def invoice_detail(invoice: Invoice) -> InvoiceDetail:
    """The API form of an invoice with its lines."""
    return InvoiceDetail(
        **invoice_out(invoice).model_dump(),
        lines=[
            InvoiceLineOut(
                id=line.id,
                price_id=line.price_id,
                metric=line.metric,
                quantity=line.quantity,
                amount=line.amount,
            )
            for line in invoice.lines
        ],
    )


@router.post(
    "/invoices/{invoice_id}/void",
    summary="Void a tenant's invoice (operator)",
    responses=problem_responses(401, 403, 404, 409, 422),
)
def void_invoice(
    invoice_id: InvoiceId,
    principal: Operator,
    session: SessionDep,
) -> InvoiceOut:
    """An open invoice becomes void (voiding again changes nothing); a paid one cannot: 409."""
    invoice = _find_invoice(session, invoice_id)
    if invoice.status == "paid":
        raise ProblemError(409, "Conflict", "a paid invoice cannot be voided", slug="invoice-paid")
    invoice.status = "void"
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
    )


def _find_invoice(session: Session, invoice_id: str, tenant_id: str | None = None) -> Invoice:
    """The invoice, of `tenant_id` when given (None: an operator's lookup, any tenant)."""
    query = select(Invoice).options(selectinload(Invoice.lines)).where(Invoice.id == invoice_id)
    if tenant_id is not None:
        query = query.where(Invoice.tenant_id == tenant_id)
    invoice = session.execute(query).scalar_one_or_none()
    if invoice is None:
        raise ProblemError(404, "Not found", "no such invoice", slug="not-found")
    return invoice


def _position(values: list[Any]) -> tuple[Any, Any]:
    start, invoice_id = values
    try:
        moment = datetime.fromisoformat(start)
    except (TypeError, ValueError) as error:
        raise invalid_cursor(str(error)) from error
    if moment.tzinfo is None or not isinstance(invoice_id, str):
        raise invalid_cursor("malformed position")
    return literal(moment, UTCDateTime()), invoice_id
