"""The caller's invoices: listed and read with `billing.read`, voided with `billing.admin`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import literal, select, tuple_
from sqlalchemy.orm import Session, selectinload

from billing.api.auth import Admin, Principal, Reader
from billing.api.deps import SessionDep
from billing.api.pagination import decode_cursor, encode_cursor, invalid_cursor
from billing.api.problems import ProblemError, problem_responses
from billing.api.schemas import InvoiceDetail, InvoiceLineOut, InvoiceOut, InvoicePage, ResourceId
from billing.models import Invoice
from webhooks.sqltypes import UTCDateTime

router = APIRouter(tags=["invoices"])

InvoiceId = Annotated[str, Path(max_length=36, pattern=ResourceId)]


@router.get(
    "/invoices", summary="The caller's invoices", responses=problem_responses(401, 403, 422)
)
def list_invoices(
    principal: Reader,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> InvoicePage:
    """Ordered by period start, then id; walking `next_cursor` returns each invoice once."""
    query = select(Invoice).where(Invoice.tenant_id == principal.tenant_id)
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
    invoice = _own_invoice(session, principal, invoice_id)
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
    summary="Void one of the caller's invoices (admin)",
    responses=problem_responses(401, 403, 404, 409, 422),
)
def void_invoice(
    invoice_id: InvoiceId,
    principal: Admin,
    session: SessionDep,
) -> InvoiceOut:
    """An open invoice becomes void (voiding again changes nothing); a paid one cannot: 409."""
    invoice = _own_invoice(session, principal, invoice_id)
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


def _own_invoice(session: Session, principal: Principal, invoice_id: str) -> Invoice:
    invoice = session.execute(
        select(Invoice)
        .options(selectinload(Invoice.lines))
        .where(Invoice.id == invoice_id, Invoice.tenant_id == principal.tenant_id)
    ).scalar_one_or_none()
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
