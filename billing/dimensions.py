"""Prices per dimension: which price of a metric bills which group of its usage.

A usage price may carry `dimensions`, metadata property → value (`{"model": "gpt-4"}`). On an
invoice, a metric's usage is split into groups by its meter's `group_by` (`billing.meters`),
and each group is billed, as its own line, by:

1. the matching price with dimensions that names the most properties (a price matches a group
   when the group has each of the price's values), so `{model, region}` beats `{model}`;
2. else each price of the metric without dimensions ("everything else");
3. else no price: the group is shown at amount 0.

Rules (checked at flush by `billing.catalog_rules`, whatever writes the price): only a usage
price has dimensions; at most `MAX_GROUP_BY` of them; each names a property of its meter's
`group_by` and a non-empty string value of up to `GROUP_VALUE_LENGTH` characters (groups are
compared on that many). Two prices of one plan, metric and currency that name as many properties
and agree on every property both name could match one group with neither more specific: the
second is refused (`PriceDefinitionError`, field `dimensions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from billing.errors import PriceDefinitionError
from billing.meters import GROUP_VALUE_LENGTH, MAX_GROUP_BY, PROPERTY, MeterSpec
from billing.models import Price
from billing.pricing import PriceTerms

Group = Mapping[str, str | None]
_Terms = TypeVar("_Terms", bound=PriceTerms)


def check_dimensions(price: Price) -> None:
    """Raise `PriceDefinitionError` if `price.dimensions` is malformed (its shape only)."""
    dimensions = price.dimensions
    if dimensions is None:
        return
    if not isinstance(dimensions, dict) or not dimensions or len(dimensions) > MAX_GROUP_BY:
        raise _invalid(price, f"dimensions must be an object of 1 to {MAX_GROUP_BY} properties")
    if price.metric is None:
        raise _invalid(price, "only a usage price (with a metric) has dimensions")
    for name, value in dimensions.items():
        if not isinstance(name, str) or not PROPERTY.match(name):
            raise _invalid(price, "dimension names are metadata keys (letters, digits, _ . : -)")
        if not isinstance(value, str) or not 0 < len(value) <= GROUP_VALUE_LENGTH:
            raise _invalid(
                price, f"dimension values are strings of 1 to {GROUP_VALUE_LENGTH} characters"
            )


def check_declared(price: Price, meter: MeterSpec) -> None:
    """Raise `PriceDefinitionError` unless each dimension is in the meter's `group_by`."""
    missing = sorted(set(price.dimensions or {}) - set(meter.group_by))
    if missing:
        raise _invalid(
            price,
            f"dimension {missing[0]!r} is not in the group_by of meter {meter.key!r}: "
            "declare the meter's group_by first",
        )


def check_conflicts(price: Price, others: Sequence[Price]) -> None:
    """Raise `PriceDefinitionError` if `price` and one of `others` (same plan, metric and
    currency) could both be the most specific match of one group."""
    mine = price.dimensions or {}
    for other in others:
        theirs = other.dimensions or {}
        if mine and other is not price and ambiguous(mine, theirs):
            raise _invalid(
                price,
                f"price {other.key!r} names as many properties and can match the same usage "
                "(name another property to make one more specific)",
            )


def ambiguous(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Whether two dimension sets of equal size can match one group."""
    return len(a) == len(b) and all(a[name] == b[name] for name in a.keys() & b.keys())


def matches(dimensions: Mapping[str, str], group: Group) -> bool:
    """Whether a group has each of the dimensions' values."""
    return all(group.get(name) == value for name, value in dimensions.items())


def prices_for(prices: Sequence[_Terms], group: Group) -> list[_Terms]:
    """The prices of one metric that bill `group` (see the module's rules; [] for none)."""
    matching = [p for p in prices if p.dimensions and matches(p.dimensions, group)]
    if matching:
        return [max(matching, key=lambda p: len(p.dimensions or {}))]
    return [p for p in prices if not p.dimensions]


def describe(metric: str | None, group: Group | None) -> str:
    """How a line is named to people: `tokens (model=gpt-4)`, `fixed fee` (not escaped)."""
    if metric is None:
        return "fixed fee"
    if not group:
        return metric
    shown = ", ".join(f"{name}={'-' if value is None else value}" for name, value in group.items())
    return f"{metric} ({shown})"


def _invalid(price: Price, message: str) -> PriceDefinitionError:
    return PriceDefinitionError(f"price {price.key!r}: {message}", field="dimensions")
