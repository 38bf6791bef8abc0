"""Monthly invoices: one per (tenant, period, currency), priced from the tenant's plans.

For each subscription active in `[period_start, period_end)`, its active interval is
`[max(period_start, effective_at), min(period_end, ended_at or ∞))`, and each price of its plan
in the invoice's currency gives its lines: a fixed fee one, prorated; a usage price one per
group of its metric it bills (see `billing.usage_lines` and `billing.dimensions`). Usage that
no price billed appears as a line with `price_id` null and amount 0, so the invoice shows all
usage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol
from typing import cast as typed

from psycopg.types.json import Json
from sqlalchemy import (
    BigInteger,
    String,
    Table,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal_column,
    select,
    true,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, make_transient_to_detached

import webhooks
from billing import driver_sql
from billing.errors import (
    AmountOverflowError,
    CurrencyMismatchError,
    InvalidPeriodError,
    InvoiceStateError,
)
from billing.ledger import MAX_AMOUNT
from billing.models import Invoice, InvoiceLine, Price, Subscription
from billing.periods import subscription_active_in, subscription_overlaps
from billing.pricing import fixed_amount
from billing.usage_lines import LineDraft, Stretch, UsageBill, bill_periods
from webhooks.interfaces import NewEvent
from webhooks.outbox import bound_event_row, publishing_ctes
from webhooks.sqltypes import UTCDateTime, new_id, utcnow

_CURRENCY = re.compile(r"^[a-z]{3}$")


class PeriodLines(Protocol):
    """A period's lines, then `adjustments`, as `price_lines` returns or raises them."""

    def __call__(self, adjustments: Sequence[LineDraft] = ()) -> list[LineDraft]: ...


def check_period(period_start: object, period_end: object, currency: object) -> str:
    """Validate an invoice's period and currency; return the currency in lower case."""
    start = _aware(period_start, "period_start")
    end = _aware(period_end, "period_end")
    if end <= start:
        raise InvalidPeriodError("period_end must be after period_start")
    return check_currency(currency)


def check_currency(currency: object) -> str:
    """Validate an ISO 4217-shaped currency code; return it in lower case."""
    if not isinstance(currency, str) or not _CURRENCY.match(currency.lower()):
        raise InvalidPeriodError("currency must be a three-letter ISO 4217 code")
    return currency.lower()


def _aware(value: object, name: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidPeriodError(f"{name} must be a timezone-aware datetime")
    return value


def find_invoice(
    session: Session, tenant_id: str, start: datetime, end: datetime, currency: str
) -> Invoice | None:
    """The invoice of that tenant, period and currency that is not void, if there is one."""
    return session.execute(
        select(Invoice).where(
            Invoice.tenant_id == tenant_id,
            Invoice.period_start == start,
            Invoice.period_end == end,
            Invoice.currency == currency,
            Invoice.status != "void",
        )
    ).scalar_one_or_none()


def drafts_covering(session: Session, tenant_id: str, times: Sequence[datetime]) -> list[str]:
    """Ids of the tenant's drafts whose period holds one of `times`, in id order (the order
    to lock them in, so that two writers never wait on each other crosswise)."""
    if not times:
        return []
    bounds = {"tenant_id": tenant_id, "last": max(times), "first": min(times)}
    rows = session.connection().execute(_DRAFTS_COVERING, bounds).all()
    return [invoice_id for invoice_id, start, end in rows if any(start <= at < end for at in times)]


_invoices = typed(Table, Invoice.__table__)
_LINES_TABLE = typed(Table, InvoiceLine.__table__)
# Run after every usage event stored, so built once on the table: no ORM work per call.
_DRAFTS_COVERING = (
    select(_invoices.c.id, _invoices.c.period_start, _invoices.c.period_end)
    .where(
        _invoices.c.tenant_id == bindparam("tenant_id"),
        _invoices.c.status == "draft",
        _invoices.c.period_start <= bindparam("last"),
        _invoices.c.period_end > bindparam("first"),
    )
    .order_by(_invoices.c.id)
)


def price_lines(
    session: Session,
    tenant_id: str,
    start: datetime,
    end: datetime,
    currency: str,
    adjustments: Sequence[LineDraft] = (),
) -> list[LineDraft]:
    """Every line of the tenant's invoice for the period, in a stable order, then
    `adjustments` (late usage of earlier invoices, `billing.adjustments`).

    Raises:
        CurrencyMismatchError: the tenant's plans in the period have prices, none in
            `currency`. (A plan that has none in it, beside one that has, as after a switch
            from a dollar plan to a euro plan mid-month, just adds no line to this invoice.)
        AmountOverflowError: a line's amount or quantity, or the total (adjustments
            included), is over 2**63-1 (the largest the ledger stores); the error names the
            line's metric and price.
    """
    [lines] = price_periods(session, tenant_id, [(start, end)], currency)
    return lines(adjustments)


def price_periods(
    session: Session,
    tenant_id: str,
    periods: Sequence[tuple[datetime, datetime]],
    currency: str,
    charged: Sequence[Collection[str]] = (),
) -> list[PeriodLines]:
    """For each period, what `price_lines` returns or raises for it, when called; what they
    read is read at once for all of them (`usage_lines.bill_periods`): one SELECT of the
    subscriptions and prices, one of the meters, one GROUP BY.

    `charged`: for the first periods, those of finalized invoices, the ids of the prices each
    invoice billed. A price of which it billed an old version (`KEY@vN`, see
    `billing.catalog`) prices that period with the old version's terms, read in one more
    SELECT when there is one: the period is priced as it was billed."""
    first, last = min(start for start, _ in periods), max(end for _, end in periods)
    subscribed = _subscriptions_with_prices(session, tenant_id, first, last)
    versions = _old_versions(session, subscribed, charged)
    outcomes: list[PeriodLines | _Priced] = []
    for index, (start, end) in enumerate(periods):
        ids = charged[index] if index < len(charged) else ()
        kept = [versions[price_id] for price_id in ids if price_id in versions]
        subscriptions = [
            (s, _as_billed(prices, kept)) for s, prices in subscribed if s.active_in(start, end)
        ]
        all_prices = [price for _, prices in subscriptions for price in prices]
        if all_prices and not any(price.currency == currency for price in all_prices):
            outcomes.append(_refused(currency))
            continue
        stretches = [
            Stretch(
                max(start, subscription.effective_at),
                min(end, subscription.ended_at) if subscription.ended_at else end,
                tuple(p for p in prices if p.currency == currency and p.metric is not None),
            )
            for subscription, prices in subscriptions
        ]
        outcomes.append(_Priced(start, end, currency, subscriptions, stretches))
    billed = [o for o in outcomes if isinstance(o, _Priced)]
    usage = bill_periods(session, tenant_id, [(o.start, o.end, o.stretches) for o in billed])
    for outcome, bill in zip(billed, usage, strict=True):
        outcome.usage = bill
    return [o.lines if isinstance(o, _Priced) else o for o in outcomes]


def _old_versions(
    session: Session,
    subscribed: list[tuple[_Subscribed, list[PlanPrice]]],
    charged: Sequence[Collection[str]],
) -> dict[str, PlanPrice]:
    """By id, the old versions (off every plan, keyed `KEY@vN`) among the `charged` prices no
    subscribed plan holds; read only when there are such prices."""
    held = {price.id for _, prices in subscribed for price in prices}
    missing = {price_id for ids in charged for price_id in ids} - held
    if not missing:
        return {}
    rows = session.execute(
        select(*(getattr(Price, field.name) for field in fields(PlanPrice))).where(
            Price.id.in_(sorted(missing)), Price.plan_id.is_(None)
        )
    )
    versions = (PlanPrice(*row) for row in rows)
    return {price.id: price for price in versions if _versioned_key(price.key) is not None}


def _versioned_key(key: str) -> str | None:
    """The key an old version (`KEY@vN`) was a version of; None for any other key."""
    base, version = key.rsplit("@v", 1) if "@v" in key else (key, "")
    return base if version.isdigit() else None


def _as_billed(prices: list[PlanPrice], versions: list[PlanPrice]) -> list[PlanPrice]:
    """`prices`, each one an invoice billed an old version of replaced by that version."""
    if not versions:
        return prices
    by_key = {_versioned_key(version.key): version for version in versions}
    return [by_key.get(price.key, price) for price in prices]


def _refused(currency: str) -> PeriodLines:
    def refuse(adjustments: Sequence[LineDraft] = ()) -> list[LineDraft]:
        raise CurrencyMismatchError(f"the tenant's plans have no price in {currency!r}")

    return refuse


@dataclass(slots=True)
class _Priced:
    """A period's subscriptions in the invoice's currency, then its usage billed (`usage`)."""

    start: datetime
    end: datetime
    currency: str
    subscriptions: list[tuple[_Subscribed, list[PlanPrice]]]
    stretches: list[Stretch]
    usage: UsageBill | None = None

    def lines(self, adjustments: Sequence[LineDraft] = ()) -> list[LineDraft]:
        """The period's lines, then `adjustments`, as `price_lines` returns them."""
        assert self.usage is not None, "billed by price_periods"
        lines: list[LineDraft] = []
        priced = zip(self.subscriptions, self.stretches, self.usage.priced, strict=True)
        for (_, prices), stretch, billed in priced:
            for price in (p for p in prices if p.currency == self.currency):
                if price.metric is None:
                    length = self.end - self.start
                    amount = fixed_amount(price, stretch.end - stretch.start, length)
                    lines.append(LineDraft(price.id, None, 1, amount))
                else:
                    lines.extend(billed[price.id])
        all_prices = [price for _, prices in self.subscriptions for price in prices]
        by_id = {price.id: price for price in all_prices}
        return _storable([*lines, *self.usage.unpriced, *adjustments], by_id)


def _storable(lines: list[LineDraft], prices: dict[str, PlanPrice]) -> list[LineDraft]:
    """`lines`, unless a quantity, an amount or their total is over what the ledger stores."""
    for line in lines:
        if line.quantity > MAX_AMOUNT or line.amount > MAX_AMOUNT:
            price = prices.get(line.price_id or "")
            raise AmountOverflowError(
                f"the line of metric {line.metric!r} at price {_described(price)} comes to "
                f"{line.quantity} units and {line.amount} minor units, over the 2**63-1 the "
                "ledger stores",
                metric=line.metric,
                price_key=price.key if price is not None else None,
            )
    total = sum(line.amount for line in lines)
    if total > MAX_AMOUNT:
        raise AmountOverflowError(
            f"the invoice's {len(lines)} lines add up to {total} minor units, over the 2**63-1 "
            "the ledger stores",
            metric=None,
            price_key=None,
        )
    return lines


def _described(price: PlanPrice | None) -> str:
    """`'pro-tokens' (2 per unit)`, `'pro-tokens' (tiered)`, or `none` for unpriced usage."""
    if price is None:
        return "none"
    unit: Decimal | int | None = price.unit_amount_decimal
    unit = unit if unit is not None else price.unit_amount
    # Without trailing zeros: PostgreSQL returns a decimal price at its column's scale.
    shown = format(Decimal(unit).normalize(), "f") if unit is not None else unit
    rate = f"{shown} per unit" if price.billing_scheme == "per_unit" else "tiered"
    return f"{price.key!r} ({rate})"


def store_invoice(
    session: Session,
    tenant_id: str,
    start: datetime,
    end: datetime,
    currency: str,
    lines: list[LineDraft],
    *,
    announce: Callable[[str], NewEvent] | None = None,
) -> Invoice | None:
    """Insert a draft invoice and its lines unless a live one exists; return the new invoice
    (None when one exists: the caller finds it). With `announce`, also store the event it
    returns for the new invoice's id in the SQL outbox (as `webhooks.publish` would).

    `INSERT … ON CONFLICT DO NOTHING RETURNING` on the partial unique index of invoices that
    are not void: when two workers race, the second waits for the first to commit and inserts
    nothing. A void invoice does not hold its period. The new row is the caller's (no other
    transaction sees it before the commit), so it needs no lock to be finalized. On PostgreSQL
    the invoice, its lines and the event are one statement on the driver's cursor
    (`billing.driver_sql`), each part written only if the invoice is.

    The new invoice's object is made from the values inserted, every column set, and added to
    the session as persistent, not read back.
    """
    now, invoice_id = utcnow(), new_id()
    row: dict[str, Any] = {
        "id": invoice_id,
        "tenant_id": tenant_id,
        "period_start": start.astimezone(UTC),
        "period_end": end.astimezone(UTC),
        "total_amount": sum(line.amount for line in lines),
        "currency": currency,
        "created_at": now,
    }
    event = announce(invoice_id) if announce is not None else None
    if session.get_bind().dialect.name == "postgresql":
        session.flush()  # what the caller added is written first, as `session.execute` would
        values = {**row, **_line_arrays(lines), **(_event_values(event) if event else {})}
        if not _STORE_ALL[event is not None].rows(session, values):
            return None
    else:
        if session.execute(_INSERT_INVOICE[False], row).scalar_one_or_none() is None:
            return None
        _insert_lines(session, invoice_id, lines, now)
        if event is not None:
            webhooks.publish(session, event.topic, event.payload, event_id=event.id)
    invoice = Invoice(**row, **_NEW_INVOICE)
    make_transient_to_detached(invoice)  # persistent once added: its row exists
    session.add(invoice)
    return invoice


def _line_arrays(lines: list[LineDraft]) -> dict[str, list[Any]]:
    """The lines as one array per column, for `unnest` (psycopg sends lists as arrays)."""
    return {
        "line_price_id": [line.price_id for line in lines],
        "line_metric": [line.metric for line in lines],
        "line_quantity": [line.quantity for line in lines],
        "line_amount": [line.amount for line in lines],
        "line_dimensions": [
            None if line.dimensions is None else Json(line.dimensions) for line in lines
        ],
        "line_kind": [line.kind for line in lines],
        "line_adjusts_invoice_id": [line.adjusts_invoice_id for line in lines],
    }


def _event_values(event: NewEvent) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "event_topic": event.topic,
        "event_tenant_id": event.tenant_id,
        "event_payload": Json(event.payload),
        "event_created_at": event.created_at,
    }


#: The columns of a new invoice `store_invoice` does not set: the object it makes has every
#: column loaded, so reading one never goes back to the database.
_NEW_INVOICE: dict[str, Any] = {
    "status": "draft",
    "provider_invoice_id": None,
    "provider_status": None,
    "number": None,
    "finalized_at": None,
    "paid_at": None,
    "voided_at": None,
}


# The partial index's predicate as a literal, never a bound parameter: psycopg prepares a
# statement run 5 times on a connection, PostgreSQL then plans it generically, and a parameter
# there keeps ON CONFLICT from inferring the index (`InvalidColumnReference`).
_LIVE = _invoices.c.status != literal_column("'void'")


def _insert_invoice(insert: Callable[[Table], Any]) -> Any:  # pragma: no mutate block
    """`store_invoice`'s statement, built once per dialect (`postgresql` or `sqlite`).

    Not mutated: it runs at import, before mutmut's forked runs choose a mutant, so none of
    its mutants would ever run (`docs/mutation-survivors.md`)."""
    columns = (
        "id",
        "tenant_id",
        "period_start",
        "period_end",
        "total_amount",
        "currency",
        "created_at",
    )
    return (
        insert(_invoices)
        .values(
            {
                **{name: bindparam(name) for name in columns},
                "status": literal_column("'draft'"),
            }
        )
        .on_conflict_do_nothing(
            index_elements=["tenant_id", "period_start", "period_end", "currency"],
            index_where=_LIVE,
        )
        .returning(_invoices.c.id)
    )


#: By whether the session's dialect is PostgreSQL.
_INSERT_INVOICE = {True: _insert_invoice(postgresql.insert), False: _insert_invoice(sqlite.insert)}


def _store_all(announce: bool) -> driver_sql.Compiled:  # pragma: no mutate block
    """PostgreSQL: `store_invoice` in one statement. The invoice's INSERT is a CTE; the lines
    (`unnest` of one array per column) and, with `announce`, the event with its deliveries
    (`webhooks.outbox.publishing_ctes`) are selected from it, so a conflict writes nothing.
    Not mutated, as `_insert_invoice`: it runs at import."""
    new = _INSERT_INVOICE[True].cte("new_invoice")
    arrays = (
        func.unnest(
            bindparam("line_price_id", type_=ARRAY(String())),
            bindparam("line_metric", type_=ARRAY(String())),
            bindparam("line_quantity", type_=ARRAY(BigInteger())),
            bindparam("line_amount", type_=ARRAY(BigInteger())),
            bindparam("line_dimensions", type_=ARRAY(postgresql.JSON())),
            bindparam("line_kind", type_=ARRAY(String())),
            bindparam("line_adjusts_invoice_id", type_=ARRAY(String())),
        )
        .table_valued(*_LINE_COLUMNS)
        .render_derived(name="line")
    )
    line_rows = select(
        cast(func.gen_random_uuid(), String),
        new.c.id,
        *(arrays.c[name] for name in _LINE_COLUMNS),
        bindparam("created_at", type_=UTCDateTime()),
    ).select_from(new.join(arrays, true()))
    columns = ["id", "invoice_id", *_LINE_COLUMNS, "created_at"]
    new_lines = (
        insert(_LINES_TABLE)
        .from_select(columns, line_rows)
        .returning(_LINES_TABLE.c.id)
        .cte("new_lines")
    )
    if not announce:
        return driver_sql.compiled(select(new.c.id).add_cte(new, new_lines))
    published = publishing_ctes(bound_event_row().select_from(new))
    statement = select(new.c.id, published.notify()).add_cte(
        new, new_lines, published.events, published.deliveries
    )
    return driver_sql.compiled(statement)


_LINE_COLUMNS = (
    "price_id",
    "metric",
    "quantity",
    "amount",
    "dimensions",
    "kind",
    "adjusts_invoice_id",
)
#: By whether the statement also stores the new invoice's event.
_STORE_ALL = {False: _store_all(False), True: _store_all(True)}


def reprice_draft(
    session: Session, invoice: Invoice, adjustments: Sequence[LineDraft] = ()
) -> None:
    """Replace a locked draft's lines and total with the pricing of its period's usage now,
    and `adjustments` (late usage of earlier invoices, `billing.adjustments`).

    Raises:
        InvoiceStateError: the invoice is not a draft; nothing is changed (a finalized
            invoice's lines and amounts never change).
        CurrencyMismatchError, AmountOverflowError: as `price_lines`; nothing is changed.
    """
    if invoice.status != "draft":
        raise InvoiceStateError(
            f"a {invoice.status} invoice cannot be re-priced",
            invoice_id=invoice.id,
            status=invoice.status,
        )
    lines = price_lines(
        session,
        invoice.tenant_id,
        invoice.period_start,
        invoice.period_end,
        invoice.currency,
        adjustments,
    )
    session.execute(delete(InvoiceLine).where(InvoiceLine.invoice_id == invoice.id))
    _insert_lines(session, invoice.id, lines, utcnow())
    invoice.total_amount = sum(line.amount for line in lines)
    session.flush()
    session.expire(invoice, ["lines"])


def _insert_lines(session: Session, invoice_id: str, lines: list[LineDraft], now: datetime) -> None:
    """One INSERT for all the lines: every row has the same keys, so Core sends them together
    (the ORM's bulk insert splits rows by which values are None)."""
    if lines:
        session.connection().execute(
            _LINES_TABLE.insert(),
            [
                {
                    "id": new_id(),
                    "invoice_id": invoice_id,
                    "price_id": line.price_id,
                    "metric": line.metric,
                    "quantity": line.quantity,
                    "amount": line.amount,
                    "dimensions": line.dimensions,
                    "created_at": now,
                    "kind": line.kind,
                    "adjusts_invoice_id": line.adjusts_invoice_id,
                }
                for line in lines
            ],
        )


@dataclass(frozen=True, slots=True)
class PlanPrice:
    """A price of a subscribed plan as an invoice reads it (`billing.pricing.PriceTerms`): its
    stored terms as plain values, not an ORM object (loading `Subscription` and `Price`
    objects was most of the client's work on the read, run for every invoice)."""

    id: str
    key: str
    currency: str
    metric: str | None
    unit_amount: int | None
    unit_amount_decimal: Decimal | None
    billing_scheme: str
    tiers_mode: str | None
    tiers: list[dict[str, Any]] | None
    transform_divide_by: int | None
    transform_round: str | None
    dimensions: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class _Subscribed:
    """A subscription active in the period: when it starts and ends (aware instants)."""

    effective_at: datetime
    ended_at: datetime | None

    def active_in(self, start: datetime, end: datetime) -> bool:
        """Whether it overlaps `[start, end)` (`periods.subscription_overlaps`)."""
        return subscription_overlaps(self.effective_at, self.ended_at, start, end)


def _subscriptions_with_prices(
    session: Session, tenant_id: str, start: datetime, end: datetime
) -> list[tuple[_Subscribed, list[PlanPrice]]]:
    """The tenant's subscriptions active in the period, each with its plan's prices (one
    SELECT): subscriptions by start, prices by creation and key."""
    bounds = {"tenant_id": tenant_id, "start": start, "end": end}
    grouped: dict[str, tuple[_Subscribed, list[PlanPrice]]] = {}
    for subscription_id, effective_at, ended_at, *terms in driver_sql.read(
        session, _SUBSCRIPTIONS_WITH_PRICES, _SUBSCRIPTIONS_WITH_PRICES_SQL, bounds
    ):
        subscribed = _Subscribed(effective_at, ended_at)
        _, prices = grouped.setdefault(subscription_id, (subscribed, []))
        if terms[0] is not None:  # None: a plan without prices
            prices.append(PlanPrice(*terms))
    return list(grouped.values())


# Run for every invoice (and every finalized invoice late usage re-prices): built once, so a
# call neither builds the statement nor computes its cache key again.
_SUBSCRIPTIONS_WITH_PRICES = (
    select(
        Subscription.id,
        Subscription.effective_at,
        Subscription.ended_at,
        *(getattr(Price, field.name) for field in fields(PlanPrice)),
    )
    .outerjoin(Price, Price.plan_id == Subscription.plan_id)
    .where(
        Subscription.tenant_id == bindparam("tenant_id"),
        subscription_active_in(
            bindparam("start", type_=UTCDateTime()), bindparam("end", type_=UTCDateTime())
        ),
    )
    .order_by(Subscription.effective_at, Subscription.id, Price.created_at, Price.key)
)
_SUBSCRIPTIONS_WITH_PRICES_SQL = driver_sql.compiled(_SUBSCRIPTIONS_WITH_PRICES)
