"""Catalogue and subscription rules, checked in Python whatever writes the rows.

A `before_flush` listener on every SQLAlchemy `Session` checks each new or changed `Price` and
`Subscription` before it is written, so the Python API, the HTTP routes and the command line
refuse the same things, and nothing is stored:

- a price: `unit_amount` from 0 to 2**63-1; `unit_amount_decimal` not negative, with at most
  12 decimal places and 18 integer digits (the column is NUMERIC(30, 12): PostgreSQL would
  round a 13th place where SQLite keeps it, and the two would bill differently); tiers as
  `billing.pricing.parse_tiers` takes them (ascending distinct bounds, flat amounts >= 0);
  a package size of at least 1; `dimensions` as `billing.dimensions` says (declared in the
  meter's `group_by`, never two equally specific prices for one group). Raises
  `PriceDefinitionError`.
- a subscription: `ended_at` not before `effective_at`, and no overlap with another of the
  tenant's subscriptions (periods are `[effective_at, ended_at)`: one ending when the next
  starts is a plan change, not an overlap). Raises `InvalidSubscriptionError`, for an overlap
  `SubscriptionConflictError` naming the other subscription. On PostgreSQL the check holds a
  transaction-level advisory lock per tenant (`lock_tenant_subscriptions`), so two sessions
  adding overlapping subscriptions at once can't both pass it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from billing import dimensions
from billing.errors import (
    InvalidSubscriptionError,
    PriceDefinitionError,
    SubscriptionConflictError,
)
from billing.meters import get_meter
from billing.models import Price, Subscription
from billing.pricing import parse_tiers

MAX_AMOUNT = 2**63 - 1
MAX_DECIMAL_PLACES = 12
MAX_INTEGER_DIGITS = 18
_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


def check_price(price: Price) -> None:
    """Raise `PriceDefinitionError` (naming the field) if `price` breaks a catalogue rule."""
    amount = price.unit_amount
    if amount is not None and (
        isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= MAX_AMOUNT
    ):
        raise PriceDefinitionError(
            f"price {price.key!r}: unit_amount must be an integer from 0 to 2**63-1",
            field="unit_amount",
        )
    if price.unit_amount_decimal is not None:
        check_decimal_amount(price.key, price.unit_amount_decimal)
    if price.billing_scheme == "tiered" or price.tiers is not None:
        try:
            parse_tiers(price.tiers)
        except PriceDefinitionError as error:
            raise PriceDefinitionError(f"price {price.key!r}: {error}", field="tiers") from error
    if price.transform_divide_by is not None and price.transform_divide_by < 1:
        raise PriceDefinitionError(
            f"price {price.key!r}: transform_divide_by must be at least 1",
            field="transform_divide_by",
        )
    dimensions.check_dimensions(price)


def check_price_dimensions(session: Session, price: Price) -> None:
    """Raise `PriceDefinitionError` if the price's dimensions are not in its meter's
    `group_by`, or another price of its plan, metric and currency is as specific for a group."""
    if not price.dimensions or price.metric is None:
        return
    dimensions.check_declared(price, get_meter(session, price.metric))
    if price.plan_id is not None:
        dimensions.check_conflicts(price, _siblings(session, price))


def _siblings(session: Session, price: Price) -> list[Price]:
    """The other prices of the price's plan, metric and currency, as this flush leaves them."""
    same = (price.plan_id, price.metric, price.currency)
    stored = session.scalars(
        select(Price).where(
            Price.plan_id == price.plan_id,
            Price.metric == price.metric,
            Price.currency == price.currency,
        )
    ).all()
    in_session = [*session.identity_map.values(), *session.new]
    pending = [o for o in in_session if isinstance(o, Price)]
    candidates = {id(p): p for p in [*stored, *pending] if p not in session.deleted}
    return [
        p
        for p in candidates.values()
        if p is not price and (p.plan_id, p.metric, p.currency) == same
    ]


def check_decimal_amount(key: str, value: Any) -> None:
    """A finite, non-negative decimal that NUMERIC(30, 12) stores exactly."""
    field = "unit_amount_decimal"
    if isinstance(value, float) or not isinstance(value, Decimal | int | str):
        raise PriceDefinitionError(f"price {key!r}: {field} must be a Decimal", field=field)
    try:
        amount = Decimal(value)
    except ArithmeticError:
        raise PriceDefinitionError(f"price {key!r}: {field} is not a number", field=field) from None
    if not amount.is_finite() or amount < 0:
        raise PriceDefinitionError(f"price {key!r}: {field} must be 0 or more", field=field)
    exponent = amount.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_DECIMAL_PLACES:
        raise PriceDefinitionError(
            f"price {key!r}: {field} has more than {MAX_DECIMAL_PLACES} decimal places",
            field=field,
        )
    if amount >= 10**MAX_INTEGER_DIGITS:
        raise PriceDefinitionError(
            f"price {key!r}: {field} has more than {MAX_INTEGER_DIGITS} integer digits",
            field=field,
        )


def check_subscriptions(session: Session, tenant_id: str, pending: list[Subscription]) -> None:
    """Raise `InvalidSubscriptionError` if a subscription in `pending` ends before it starts
    or overlaps another of the tenant's (stored, or pending in this session)."""
    for sub in pending:
        if sub.ended_at is not None and sub.ended_at < sub.effective_at:
            raise InvalidSubscriptionError(
                f"subscription of tenant {tenant_id!r} ends before it starts", field="ended_at"
            )
    lock_tenant_subscriptions(session, tenant_id)
    periods = _periods(session, tenant_id)
    for sub in pending:
        mine = (sub.effective_at, sub.ended_at)
        for other, period in periods.items():
            if other != _key(sub) and _overlap(mine, period):
                existing_id = other if isinstance(other, str) else None
                raise SubscriptionConflictError(
                    f"subscription of tenant {tenant_id!r} from {mine[0].isoformat()} overlaps "
                    f"{existing_id or 'another'} from {period[0].isoformat()}: end that one first",
                    existing_id=existing_id,
                )


def lock_tenant_subscriptions(session: Session, tenant_id: str) -> None:
    """On PostgreSQL, hold the tenant's subscriptions lock until the transaction ends (a no-op
    on SQLite, whose writers are serialized anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_LOCK, {"key": f"subscriptions:{tenant_id}"})


Period = tuple[datetime, datetime | None]


def _periods(session: Session, tenant_id: str) -> dict[object, Period]:
    """Every subscription period of the tenant as this flush will leave it."""
    stored = session.execute(
        select(Subscription.id, Subscription.effective_at, Subscription.ended_at).where(
            Subscription.tenant_id == tenant_id
        )
    ).all()
    periods: dict[object, Period] = {row.id: (row.effective_at, row.ended_at) for row in stored}
    in_session = [*session.identity_map.values(), *session.new]
    for obj in in_session:
        if isinstance(obj, Subscription):
            periods.pop(obj.id, None)
            if obj.tenant_id == tenant_id and obj not in session.deleted:
                periods[_key(obj)] = (obj.effective_at, obj.ended_at)
    return periods


def _key(sub: Subscription) -> object:
    return sub.id if sub.id is not None else sub


def _overlap(a: Period, b: Period) -> bool:
    if _empty(a) or _empty(b):
        return False
    a_ends_after_b_starts = a[1] is None or a[1] > b[0]
    b_ends_after_a_starts = b[1] is None or b[1] > a[0]
    return a_ends_after_b_starts and b_ends_after_a_starts


def _empty(period: Period) -> bool:
    return period[1] is not None and period[1] <= period[0]


def _changed(session: Session, objects: Iterable[object], kind: type) -> list[Any]:
    return [o for o in objects if isinstance(o, kind) and o not in session.deleted]


@event.listens_for(Session, "before_flush")
def _check_before_flush(session: Session, _context: object, _instances: object) -> None:
    touched = [*session.new, *(o for o in session.dirty if session.is_modified(o))]
    for price in _changed(session, touched, Price):
        check_price(price)
        check_price_dimensions(session, price)
    subscriptions = _changed(session, touched, Subscription)
    for tenant_id in sorted({s.tenant_id for s in subscriptions}):
        check_subscriptions(
            session, tenant_id, [s for s in subscriptions if s.tenant_id == tenant_id]
        )
