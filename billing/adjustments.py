"""Late usage billed on the next invoice (`LATE_USAGE=next_invoice`).

When a tenant's next invoice in a currency is generated (or a draft re-priced), each finalized
invoice of that tenant and currency whose period ended within `LATE_USAGE_LOOKBACK` of the
clock (a reissue after a void: or that was finalized within it, as it billed its whole period
again) is priced again with all of its period's usage known now (`invoicing.price_lines`, the
rule that priced it; a new invoice's period and theirs from one read of the ledger,
`invoicing.price_periods`). Per key (price, metric and, for prices per dimension, group) of each
usage price that invoice billed and its plans still have, whether the invoice had a line of
that key or not (a group first used late: one the invoice shows under no price, of a metric
whose usage it grouped by the same properties):

    pending = price(usage now) − (its lines + adjustments billed since − late credits since)

A positive `pending` becomes an `adjustment` line of the new invoice (the extra quantity and
amount, `adjusts_invoice_id`); a negative one (volume tiers can lower the price of more units)
a credit note on the finalized invoice, whose line names the line it re-prices and the late
units (`quantity`), and for what exceeds that invoice's total (or all of it, for a key the
invoice had no line of), on the invoices that billed adjustments for its period. Tiered
prices thus bill price(new total) − price(old total), not the late units at a marginal guess.
A price changed since the invoice was billed is re-priced with the old version the invoice
billed (`KEY@vN`, `billing.catalog`), never with the new terms. What a catalog change moves is
not re-priced: a price the invoice did not bill (added to the plan since, or a new version of
one), a key no price bills now (a dimensional price added), a group the invoice showed under
another price (one retired) or grouped otherwise (the meter's `group_by` changed); the
period's usage was billed at the prices it had.

"Billed since" is read from what is stored, never remembered elsewhere: adjustment lines on
invoices that are not void, for any invoice of the same period (a reissue after a void
inherits what was billed for its period), and late-usage credit notes on invoices that are
not void, against its lines or those adjustment lines. The finalized invoices are locked
(`FOR UPDATE`, in id order) before anything is read, so two invoice runs of a tenant take
turns and the second finds what the first billed: each adjustment is billed exactly once,
also when runs race or are retried.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    any_,
    bindparam,
    func,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased

from billing import credit_notes, driver_sql
from billing.errors import CurrencyMismatchError
from billing.invoicing import PeriodLines, price_periods
from billing.late_usage import FINALIZED
from billing.lifecycle import Outbox
from billing.models import CreditNote, CreditNoteLine, Invoice, InvoiceLine
from billing.usage_lines import LineDraft

LATE_USAGE_REASON = "late usage re-priced"
Key = tuple[str, str, str]
"""A usage line's (price id, metric, group as canonical JSON)."""
Dimensions = dict[str, str | None] | None


@dataclass(frozen=True, slots=True)
class Adjustment:
    """What late usage adds to one line of a finalized invoice: `amount` > 0 is billed on the
    next invoice, `amount` < 0 credited on `adjusts_invoice_id`."""

    adjusts_invoice_id: str
    adjusts_line_id: str | None
    """The invoice's first line of the price and group; None when it had none (usage first
    seen late): a credit then goes to the adjustment lines that billed it."""
    price_id: str
    metric: str
    quantity: int
    amount: int
    dimensions: Dimensions = None


@dataclass(slots=True)
class _Tally:
    quantity: int = 0
    amount: int = 0


def pending_adjustments(
    session: Session,
    tenant_id: str,
    currency: str,
    now: datetime,
    *,
    lookback: timedelta,
    exclude_invoice_id: str | None,
    lock: bool,
) -> list[Adjustment]:
    """The adjustments not billed yet of the tenant's finalized invoices in `currency` whose
    period ended at or after `now - lookback` (a reissue after a void: or that was finalized
    then), oldest period first. Stores nothing.

    `exclude_invoice_id`: a draft about to be re-priced, whose own adjustment lines are about to
    be replaced, so they do not count as billed. `lock`: lock those finalized invoices first
    (the caller will bill what is returned, in this transaction).
    """
    pending, _ = _pending(
        session, tenant_id, currency, now - lookback, exclude=exclude_invoice_id, lock=lock
    )
    return pending


def pending_with_lines(
    session: Session,
    tenant_id: str,
    currency: str,
    now: datetime,
    *,
    lookback: timedelta,
    period: tuple[datetime, datetime],
) -> tuple[list[Adjustment], PeriodLines]:
    """`pending_adjustments` (locking, none excluded) for a new invoice of `period`, and its
    lines as `invoicing.price_lines` returns or raises them when called: the finalized
    invoices' periods and `period` priced from one read of the ledger
    (`invoicing.price_periods`)."""
    pending, [lines] = _pending(
        session, tenant_id, currency, now - lookback, exclude=None, lock=True, periods=[period]
    )
    return pending, lines


def _pending(
    session: Session,
    tenant_id: str,
    currency: str,
    since: datetime,
    *,
    exclude: str | None,
    lock: bool,
    periods: Sequence[tuple[datetime, datetime]] = (),
) -> tuple[list[Adjustment], list[PeriodLines]]:
    """The adjustments pending, and the pricing of `periods` (priced with the finalized
    invoices' whose usage was billed, each with the versions of prices it billed)."""
    finalized = _recent_finalized(session, tenant_id, currency, since, lock=lock)
    read = [(invoice, _billed(session, invoice, exclude)) for invoice in finalized]
    repriced = [(invoice, billed) for invoice, billed in read if billed.charged]
    bounds = [(invoice.period_start, invoice.period_end) for invoice, _ in repriced]
    if not bounds and not periods:
        return [], []
    charged = [{key[0] for key in billed.charged} for _, billed in repriced]
    priced = price_periods(session, tenant_id, [*bounds, *periods], currency, charged)
    pending = [
        adjustment
        for (invoice, billed), lines in zip(repriced, priced, strict=False)
        for adjustment in _of_invoice(invoice, billed, lines)
    ]
    return pending, priced[len(repriced) :]


def adjustment_lines(adjustments: Sequence[Adjustment]) -> list[LineDraft]:
    """The lines of the next invoice: the adjustments whose amount is positive."""
    return [
        LineDraft(
            a.price_id,
            a.metric,
            a.quantity,
            a.amount,
            dimensions=a.dimensions,
            kind="adjustment",
            adjusts_invoice_id=a.adjusts_invoice_id,
        )
        for a in adjustments
        if a.amount > 0
    ]


def credit_overbilled(
    session: Session,
    tenant_id: str,
    adjustments: Sequence[Adjustment],
    *,
    now: Callable[[], datetime],
    outbox: Outbox,
) -> None:
    """Credit each negative adjustment: on its finalized invoice first, then, for what that
    invoice cannot take (its total less its credit notes), on the invoices that billed
    adjustments for its period, newest first (each up to what its adjustment lines billed).
    Only `open` and `paid` invoices are credited; what none can take stays pending."""
    for adjustment in adjustments:
        remaining, quantity = -adjustment.amount, adjustment.quantity
        for invoice, line_id, room in _creditable(session, adjustment) if remaining > 0 else ():
            amount = min(remaining, room)
            if amount <= 0:
                continue
            line = credit_notes.CreditLine(
                amount,
                invoice_line_id=line_id,
                # under 200 characters: a metric has 100 at most
                description=f"late usage of {adjustment.metric}: {quantity:+d}",
                quantity=quantity,  # the late units are counted once, on the first note
            )
            credit_notes.create(
                session,
                tenant_id,
                invoice.id,
                amount=amount,
                lines=[line],
                reason=LATE_USAGE_REASON,
                now=now,
                outbox=outbox,
            )
            remaining, quantity = remaining - amount, 0
            if remaining == 0:
                break


def _creditable(session: Session, adjustment: Adjustment) -> Iterator[tuple[Invoice, str, int]]:
    """(invoice, line, how much it can be credited) for a negative adjustment, in order."""
    # as it is now, locked (with the tenant's other finalized invoices, first)
    original = session.get(Invoice, adjustment.adjusts_invoice_id, populate_existing=True)
    assert original is not None, "a finalized invoice is never deleted"
    if adjustment.adjusts_line_id is not None and original.status in credit_notes.CREDITABLE:
        room = original.total_amount - credit_notes.credited(session, original.id)
        yield original, adjustment.adjusts_line_id, room
    key = _key(adjustment.price_id, adjustment.metric, adjustment.dimensions)
    carrier, target = aliased(Invoice), aliased(Invoice)
    lines = session.execute(
        select(carrier, InvoiceLine)
        .join(carrier, carrier.id == InvoiceLine.invoice_id)
        .join(target, target.id == InvoiceLine.adjusts_invoice_id)
        .where(
            InvoiceLine.kind == "adjustment",
            carrier.status.in_(credit_notes.CREDITABLE),
            *_same_period(target),
        )
        .order_by(InvoiceLine.created_at.desc(), InvoiceLine.id),
        _period_of(original),
    ).all()
    for invoice, line in lines:
        if _key(line.price_id, line.metric, line.dimensions) != key:
            continue
        on_line = _credited_line(session, line.id)
        room = invoice.total_amount - credit_notes.credited(session, invoice.id)
        yield invoice, line.id, min(room, line.amount - on_line)


def _credited_line(session: Session, line_id: str) -> int:
    total = session.scalar(
        select(func.coalesce(func.sum(CreditNoteLine.amount), 0)).where(
            CreditNoteLine.invoice_line_id == line_id
        )
    )
    return int(total or 0)


def _same_period(target: Any) -> list[ColumnElement[bool]]:
    """SQL conditions: `target` is an invoice of the tenant, currency and period bound as
    `_period_of` binds them."""
    return [
        target.tenant_id == bindparam("tenant_id"),
        target.currency == bindparam("currency"),
        target.period_start == bindparam("period_start"),
        target.period_end == bindparam("period_end"),
    ]


def _period_of(invoice: Invoice | _Finalized) -> dict[str, Any]:
    """The values `_same_period`'s conditions are bound to: the invoice's tenant, currency and
    period."""
    return {
        "tenant_id": invoice.tenant_id,
        "currency": invoice.currency,
        "period_start": invoice.period_start,
        "period_end": invoice.period_end,
    }


@dataclass(frozen=True, slots=True)
class _Finalized:
    """A finalized invoice in the lookback, as re-pricing reads it: plain values, not an ORM
    object (loading one was most of the client's work on this read, run for every invoice)."""

    id: str
    tenant_id: str
    currency: str
    period_start: datetime
    period_end: datetime


def _recent_finalized(
    session: Session, tenant_id: str, currency: str, since: datetime, *, lock: bool
) -> list[_Finalized]:
    bounds = {"tenant_id": tenant_id, "currency": currency, "since": since}
    rows = driver_sql.read(session, *_RECENT_FINALIZED[lock], bounds)
    invoices = [_Finalized(*row) for row in rows]
    return sorted(invoices, key=lambda invoice: (invoice.period_start, invoice.id))


def _recent_finalized_query(
    finalized: ColumnElement[bool], *, lock: bool
) -> Any:  # pragma: no mutate block
    # A reissue after a void bills its whole period again: it is re-priced (and credited what
    # its predecessor's period was billed in adjustments) as long as it was finalized recently.
    void = aliased(Invoice)
    reissue = select(void.id).where(
        void.tenant_id == bindparam("tenant_id"),
        void.currency == bindparam("currency"),
        void.period_start == Invoice.period_start,
        void.period_end == Invoice.period_end,
        void.status == "void",
    )
    query = select(*(getattr(Invoice, field.name) for field in fields(_Finalized))).where(
        Invoice.tenant_id == bindparam("tenant_id"),
        Invoice.currency == bindparam("currency"),
        finalized,
        or_(
            Invoice.period_end >= bindparam("since"),
            and_(Invoice.finalized_at >= bindparam("since"), reissue.exists()),
        ),
    )
    # In id order: two runs lock the same rows in the same order, no deadlock.
    return query.order_by(Invoice.id).with_for_update() if lock else query


# Read for every invoice: built once. By `lock`: the statement, and the same for the driver's
# cursor (the statuses as one array, not an IN list SQLAlchemy expands per execution).
_RECENT_FINALIZED = {
    lock: (
        _recent_finalized_query(Invoice.status.in_(FINALIZED), lock=lock),
        driver_sql.compiled(
            _recent_finalized_query(
                Invoice.status == any_(literal(list(FINALIZED), ARRAY(String()))), lock=lock
            )
        ),
    )
    for lock in (False, True)
}


def _of_invoice(invoice: _Finalized, billed: _Billed, price: PeriodLines) -> list[Adjustment]:
    """Per key priced now (`price`: the period's `price_lines`) of a usage price the invoice
    billed (its groups the invoice had lines for, and those first used late): price now −
    billed so far."""
    try:
        lines = price()
    except CurrencyMismatchError:  # the plans changed currency since: nothing to re-price
        return []
    now_priced = _tally(
        (_key(line.price_id, line.metric, line.dimensions), line.quantity, line.amount)
        for line in lines
    )
    # Not re-priced: a price that left the plan or one the invoice did not bill (added since,
    # or a new version of one), a key no price bills now: the catalog changed, and the
    # period's usage was billed at the prices it had.
    prices = {key[0] for key in billed.charged} & {key[0] for key in now_priced}
    parts = (now_priced, billed.charged, billed.adjusted, billed.credited)
    pending = []
    for key in now_priced:
        if key[0] not in prices or (key not in billed.charged and not billed.first_used_late(key)):
            continue
        now, own, more, less = (part.get(key, _Tally()) for part in parts)
        amount = now.amount - (own.amount + more.amount - less.amount)
        quantity = now.quantity - (own.quantity + more.quantity + less.quantity)
        if amount:
            dimensions = json.loads(key[2]) if key[2] else None
            line_id = billed.first_line.get(key)
            pending.append(
                Adjustment(invoice.id, line_id, *key[:2], quantity, amount, dimensions=dimensions)
            )
    return pending


@dataclass(slots=True)
class _Billed:
    """What an invoice's usage was billed so far, by key: its own lines (`charged`, and the
    first line of each key), the adjustments for its period and the late credits on either;
    the (metric, group) of each of its lines, and by metric the property names its lines
    with usage are grouped by."""

    first_line: dict[Key, str] = field(default_factory=dict)
    charged: dict[Key, _Tally] = field(default_factory=dict)
    adjusted: dict[Key, _Tally] = field(default_factory=dict)
    credited: dict[Key, _Tally] = field(default_factory=dict)
    shown: set[tuple[str, str]] = field(default_factory=set)
    grouped_by: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)

    def first_used_late(self, key: Key) -> bool:
        """Whether the key's group is one the invoice shows under no price, of a metric its
        usage was grouped alike (not a group a price, or the meter's `group_by`, moved since)."""
        _, metric, group = key
        names = tuple(sorted(json.loads(group))) if group else ()
        return (metric, group) not in self.shown and self.grouped_by.get(metric, {names}) == {names}


def _tally(rows: Iterable[tuple[Key, int, int]]) -> dict[Key, _Tally]:
    """Quantities and amounts added up by key."""
    tallies: dict[Key, _Tally] = {}
    for key, quantity, amount in rows:
        tally = tallies.setdefault(key, _Tally())
        tally.quantity += quantity
        tally.amount += amount
    return tallies


def _billed(session: Session, invoice: _Finalized, exclude: str | None) -> _Billed:
    """In one statement: the invoice's own usage lines (priced or not); the adjustment
    lines billed for its period on invoices that are not void (but `exclude`); the late-usage
    credit note lines (those with a quantity) on invoices that are not void, against its own
    lines or those adjustment lines."""
    values = {**_period_of(invoice), "invoice_id": invoice.id, "exclude": exclude}
    billed = _Billed()
    for part, line_id, price_id, metric, dims, quantity, amount, _ in driver_sql.read(
        session, _BILLED, _BILLED_SQL, values
    ):
        key = _key(price_id, metric, dims)
        if part == _CHARGE:
            billed.shown.add(key[1:])
            if quantity:
                billed.grouped_by.setdefault(key[1], set()).add(tuple(sorted(dims or {})))
            if not price_id:  # usage no price billed: shown at 0
                continue
            billed.first_line.setdefault(key, line_id)
            tallies = billed.charged
        else:  # always a usage line's: only late usage writes adjustments and quantities
            tallies = billed.adjusted if part == _ADJUSTMENT else billed.credited
        tally = tallies.setdefault(key, _Tally())
        tally.quantity += quantity or 0
        tally.amount += amount
    return billed


# Each finalized invoice in the lookback runs this at every invoice of its tenant (a monthly
# run re-prices last month's): built once (building its joins per call took most of the
# time), and its three parts sent at once.
_CHARGE, _ADJUSTMENT, _CREDIT = 0, 1, 2
_carrier = aliased(Invoice)
_target = aliased(Invoice)
_credit_line = aliased(InvoiceLine)
_holder = aliased(Invoice)
_EXCLUDE = bindparam("exclude", type_=String())
_LINE_FIELDS = (
    InvoiceLine.id,
    InvoiceLine.price_id,
    InvoiceLine.metric,
    InvoiceLine.dimensions,
    InvoiceLine.quantity,
    InvoiceLine.amount,
    InvoiceLine.created_at,
)
_BILLED: Any = union_all(
    select(
        literal(_CHARGE).label("part"),
        *_LINE_FIELDS,
    ).where(
        InvoiceLine.invoice_id == bindparam("invoice_id"),
        InvoiceLine.kind == "charge",
        InvoiceLine.metric.is_not(None),
    ),
    select(
        literal(_ADJUSTMENT),
        *_LINE_FIELDS,
    )
    .join(_carrier, _carrier.id == InvoiceLine.invoice_id)
    .join(_target, _target.id == InvoiceLine.adjusts_invoice_id)
    .where(
        InvoiceLine.kind == "adjustment",
        _carrier.status != "void",
        or_(_EXCLUDE.is_(None), _carrier.id != _EXCLUDE),
        *_same_period(_target),
    ),
    select(
        literal(_CREDIT),
        _credit_line.id,
        _credit_line.price_id,
        _credit_line.metric,
        _credit_line.dimensions,
        CreditNoteLine.quantity,
        CreditNoteLine.amount,
        _credit_line.created_at,
    )
    .join(CreditNote, CreditNote.id == CreditNoteLine.credit_note_id)
    .join(_holder, _holder.id == CreditNote.invoice_id)
    .join(_credit_line, _credit_line.id == CreditNoteLine.invoice_line_id)
    .outerjoin(_target, _target.id == _credit_line.adjusts_invoice_id)
    .where(
        CreditNoteLine.quantity.is_not(None),
        _holder.status != "void",
        or_(
            and_(
                _credit_line.invoice_id == bindparam("invoice_id"),
                _credit_line.kind == "charge",
            ),
            and_(*_same_period(_target)),
        ),
    ),
).order_by("part", "created_at", "id")
_BILLED_SQL = driver_sql.compiled(_BILLED)


def _key(price_id: str | None, metric: str | None, dimensions: Dimensions) -> Key:
    """A usage line's price, metric and group (`{"model": "gpt-4"}`, canonical JSON)."""
    group = "" if dimensions is None else json.dumps(dimensions, sort_keys=True)
    return (price_id or "", metric or "", group)
