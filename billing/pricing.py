"""Exact pricing: what one invoice line costs, in minor units.

All arithmetic is on `Fraction`s, so nothing is lost before the single rounding of a line
(half up, to an integer minor unit). Money never touches a float.

- fixed: unit price × the share of the period the subscription was active;
- per unit: q' × unit price;
- tiered graduated: each tier bills the units inside it at its price, plus its flat amount if any
  unit falls inside it;
- tiered volume: all q' units at the price of the tier q' falls in, plus that tier's flat amount
  (q' = 0 bills 0);
where q' is the usage, or ⌈q/d⌉ / ⌊q/d⌋ with package pricing (`transform_divide_by` d).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any, Protocol

from billing.errors import PriceDefinitionError


class PriceTerms(Protocol):
    """What pricing reads of a price: a stored `billing.models.Price`, or the terms an invoice
    reads of one (`billing.invoicing.PlanPrice`)."""

    @property
    def id(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def currency(self) -> str: ...
    @property
    def metric(self) -> str | None: ...
    @property
    def unit_amount(self) -> int | None: ...
    @property
    def unit_amount_decimal(self) -> Decimal | None: ...
    @property
    def billing_scheme(self) -> str: ...
    @property
    def tiers_mode(self) -> str | None: ...
    @property
    def tiers(self) -> list[dict[str, Any]] | None: ...
    @property
    def transform_divide_by(self) -> int | None: ...
    @property
    def transform_round(self) -> str | None: ...
    @property
    def dimensions(self) -> dict[str, str] | None: ...


@dataclass(frozen=True, slots=True)
class Tier:
    """One tier: units up to `up_to` (None: no bound) at `unit_amount`, plus `flat_amount`."""

    up_to: int | None
    unit_amount: Fraction
    flat_amount: int


def round_half_up(amount: Fraction) -> int:
    """Round an exact amount to an integer minor unit, halves away from zero."""
    if amount < 0:
        return -round_half_up(-amount)
    return math.floor(amount + Fraction(1, 2))


def unit_price(price: PriceTerms) -> Fraction:
    """`unit_amount_decimal` when set, else `unit_amount`, as an exact fraction."""
    if price.unit_amount_decimal is not None:
        return _exact(price.unit_amount_decimal)
    if price.unit_amount is None:
        raise PriceDefinitionError(f"price {price.key!r} has no unit amount")
    return Fraction(price.unit_amount)


def fixed_amount(price: PriceTerms, active: timedelta, period: timedelta) -> int:
    """A fixed price prorated by the active share of the period."""
    if period <= timedelta(0):
        raise PriceDefinitionError("a billing period must be longer than zero")
    share = Fraction(_microseconds(active), _microseconds(period))
    return round_half_up(unit_price(price) * share)


def usage_amount(price: PriceTerms, quantity: int) -> int:
    """What `quantity` units of the usage price cost, rounded once."""
    billable = billable_quantity(quantity, price.transform_divide_by, price.transform_round)
    if price.billing_scheme == "per_unit":
        return round_half_up(billable * unit_price(price))
    tiers = parse_tiers(price.tiers)
    if price.tiers_mode == "graduated":
        return round_half_up(graduated_cost(tiers, billable))
    if price.tiers_mode == "volume":
        return round_half_up(volume_cost(tiers, billable))
    raise PriceDefinitionError(f"price {price.key!r}: unknown tiers_mode {price.tiers_mode!r}")


def billable_quantity(quantity: int, divide_by: int | None, rounding: str | None) -> int:
    """Package pricing: ⌈q/d⌉ (`up`, the default) or ⌊q/d⌋ (`down`); q without a transform."""
    if not divide_by:
        return quantity
    if divide_by < 0:
        raise PriceDefinitionError("transform_divide_by must be positive")
    if rounding == "down":
        return quantity // divide_by
    return -(-quantity // divide_by)


def graduated_cost(tiers: Sequence[Tier], quantity: int) -> Fraction:
    """Each tier bills the units that fall inside it, plus its flat amount if any do."""
    cost = Fraction(0)
    lower = 0
    for tier in tiers:
        if quantity <= lower:
            break
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        cost += (upper - lower) * tier.unit_amount + tier.flat_amount  # units > 0: up_to > lower
        if tier.up_to is None:
            break
        lower = tier.up_to
    return cost


def volume_cost(tiers: Sequence[Tier], quantity: int) -> Fraction:
    """All units at the price of the tier the quantity falls in, plus its flat amount."""
    if quantity == 0:
        return Fraction(0)
    for tier in tiers:
        if tier.up_to is None or quantity <= tier.up_to:
            return quantity * tier.unit_amount + tier.flat_amount
    raise PriceDefinitionError("tiers must end with an unbounded tier (up_to null)")


def parse_tiers(raw: Sequence[Mapping[str, Any]] | None) -> list[Tier]:
    """Validate the JSON tiers of a price: ascending `up_to`, the last one null."""
    if not raw:
        raise PriceDefinitionError("a tiered price needs tiers")
    tiers: list[Tier] = []
    previous = 0
    for index, item in enumerate(raw):
        up_to = item.get("up_to")
        last = index == len(raw) - 1
        if last != (up_to is None):
            raise PriceDefinitionError("only the last tier has up_to null, and it must")
        if up_to is not None:
            if isinstance(up_to, bool) or not isinstance(up_to, int) or up_to <= previous:
                raise PriceDefinitionError("tier up_to values must be ascending positive ints")
            previous = up_to
        unit = item.get("unit_amount_decimal")
        flat = item.get("flat_amount")
        if flat is not None and (isinstance(flat, bool) or not isinstance(flat, int) or flat < 0):
            raise PriceDefinitionError("tier flat_amount must be a non-negative integer")
        tiers.append(Tier(up_to, _exact(unit) if unit is not None else Fraction(0), flat or 0))
    return tiers


def _exact(value: Decimal | str | int) -> Fraction:
    if isinstance(value, float):  # a float would already have lost the exact price
        raise PriceDefinitionError("unit amounts must be decimal strings, not floats")
    try:
        fraction = Fraction(Decimal(str(value)))
    except (ArithmeticError, ValueError) as error:
        raise PriceDefinitionError(f"not a decimal amount: {value!r}") from error
    if fraction < 0:
        raise PriceDefinitionError(f"unit amounts cannot be negative: {value!r}")
    return fraction


def _microseconds(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
