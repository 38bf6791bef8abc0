"""The usage lines of an invoice: each metric's usage, per stretch of the period and per group,
aggregated in SQL under its meter, then priced per group.

The period is cut into stretches: one per subscription active in it (its usage prices) and the
gaps between them (no price). In each stretch, a metric's events are grouped by its meter's
`group_by` (plus any property a price of it names, should the meter have dropped one) and each
group is aggregated once in SQL; `billing.dimensions` says which price bills which group.

- A group a price bills is a line of that price, with the group as its `dimensions`; every
  scheme applies to the group's quantity. A price that bills no group still gets a line at 0.
- A group no price bills is a line at amount 0 (`price_id` null), one per metric and group for
  the whole period: its stretches combine under the aggregation (sums and counts add up, `max`
  takes the largest, `latest` the last stretch's, `unique_count` is counted again in SQL over
  those stretches). Groups whose quantity is 0 are left out.

So a plan switch mid-period bills each subscription for the quantity of its own stretch:
`max` and `latest` are neither prorated nor added across subscriptions (see `billing.meters`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import ColumnElement, and_, func, or_
from sqlalchemy.orm import Session

from billing.dimensions import prices_for
from billing.meters import GROUP_VALUE_LENGTH, MeterSpec, grouped_quantities
from billing.meters import property_text as _property_text
from billing.models import UsageEvent
from billing.pricing import PriceTerms, usage_amount
from billing.usage_quantities import Quantities, Values, meters_in_use, period_quantities


@dataclass(frozen=True, slots=True)
class LineDraft:
    """An invoice line before it is stored."""

    price_id: str | None
    metric: str | None
    quantity: int
    amount: int
    dimensions: dict[str, str | None] | None = None
    kind: str = "charge"
    adjusts_invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class Stretch:
    """`[start, end)` of the period under one subscription's usage prices (none in a gap)."""

    start: datetime
    end: datetime
    prices: tuple[PriceTerms, ...] = ()


@dataclass(frozen=True, slots=True)
class UsageBill:
    """The lines of each stretch's usage prices (by price id; the stretches in the order
    given) and the unpriced lines."""

    priced: list[dict[str, list[LineDraft]]]
    unpriced: list[LineDraft]


Period = tuple[datetime, datetime, Sequence[Stretch]]
"""`[start, end)` and its subscriptions' stretches (ordered, not overlapping, inside it)."""


def bill_periods(session: Session, tenant_id: str, periods: Sequence[Period]) -> list[UsageBill]:
    """Price the tenant's usage in each of `periods` (a finalized invoice's re-priced with the
    next one's), the ledger read for all of them at once: one statement for the meters, one
    GROUP BY for every period's stretches, unless periods overlap or group a metric differently
    (for a property a price of one names): then one GROUP BY per period."""
    if not periods:
        return []
    prices_of = [_prices_by_metric(stretches) for _, _, stretches in periods]
    priced = sorted({metric for prices in prices_of for metric in prices})
    first, last = min(start for start, _, _ in periods), max(end for _, end, _ in periods)
    meters = meters_in_use(session, tenant_id, first, last, priced)
    specs = [
        {metric: _spec(meters[metric], prices[metric]) for metric in sorted(meters)}
        for prices in prices_of
    ]
    everywhere = [
        sorted([*stretches, *_gaps(start, end, stretches)], key=lambda s: s.start)
        for start, end, stretches in periods
    ]
    quantities = _quantities(session, tenant_id, specs, everywhere)
    return [
        _bill(session, tenant_id, *parts)
        for parts in zip(specs, everywhere, quantities, [p[2] for p in periods], strict=True)
    ]


def _prices_by_metric(stretches: Sequence[Stretch]) -> dict[str, list[PriceTerms]]:
    prices_of: dict[str, list[PriceTerms]] = defaultdict(list)
    for stretch in stretches:
        for price in stretch.prices:
            prices_of[str(price.metric)].append(price)
    return prices_of


def _quantities(
    session: Session,
    tenant_id: str,
    specs: list[dict[str, MeterSpec]],
    everywhere: list[list[Stretch]],
) -> list[Quantities]:
    """Each period's quantities, by its own stretches' indexes."""
    bounds = [[(stretch.start, stretch.end) for stretch in stretches] for stretches in everywhere]
    if len(bounds) == 1 or not _one_read(bounds, specs):
        return [
            period_quantities(session, tenant_id, period, list(period_specs.values()))
            for period, period_specs in zip(bounds, specs, strict=True)
        ]
    flat = [bound for period in bounds for bound in period]
    found = period_quantities(session, tenant_id, flat, list(specs[0].values()))
    split: list[Quantities] = [{} for _ in bounds]
    # stretch i of the read: (its period, its index in that period)
    owners = [(n, index) for n, period in enumerate(bounds) for index in range(len(period))]
    for (index, metric), groups in found.items():
        period, own = owners[index]
        split[period][own, metric] = groups
    return split


def _one_read(
    bounds: list[list[tuple[datetime, datetime]]], specs: list[dict[str, MeterSpec]]
) -> bool:
    """Whether the periods can be read by one GROUP BY: no two stretches overlap (an event
    counts in the first that holds it) and every metric is grouped alike."""
    flat = sorted(bound for period in bounds for bound in period)
    overlapping = any(end > start for (_, end), (start, _) in zip(flat, flat[1:], strict=False))
    return not overlapping and all(period == specs[0] for period in specs)


def _bill(
    session: Session,
    tenant_id: str,
    specs: dict[str, MeterSpec],
    everywhere: list[Stretch],
    quantities: Quantities,
    stretches: Sequence[Stretch],
) -> UsageBill:
    """The period's lines from its quantities (`everywhere`: its stretches and gaps)."""
    leftovers: dict[tuple[str, Values], list[tuple[Stretch, int]]] = defaultdict(list)
    priced: dict[int, dict[str, list[LineDraft]]] = {id(stretch): {} for stretch in everywhere}
    for index, stretch in enumerate(everywhere):
        for metric, spec in specs.items():
            prices = [p for p in stretch.prices if p.metric == metric]
            used = quantities.get((index, metric), {})
            priced[id(stretch)].update(_price_groups(spec, stretch, prices, used, leftovers))
    return UsageBill(
        [priced[id(stretch)] for stretch in stretches],
        _unpriced(session, tenant_id, specs, leftovers),
    )


def _price_groups(
    spec: MeterSpec,
    stretch: Stretch,
    prices: list[PriceTerms],
    quantities: dict[Values, int],
    leftovers: dict[tuple[str, Values], list[tuple[Stretch, int]]],
) -> dict[str, list[LineDraft]]:
    """The lines of each of `prices` in the stretch; the groups none bills go to `leftovers`."""
    lines: dict[str, list[LineDraft]] = {price.id: [] for price in prices}
    for values in sorted(quantities, key=_values_order):
        used = quantities[values]
        group = dict(zip(spec.group_by, values, strict=True))
        billers = prices_for(prices, group)
        if not billers:
            leftovers[spec.key, values].append((stretch, used))
        for price in billers:
            amount = usage_amount(price, used)
            dims = group if spec.group_by else None
            lines[price.id].append(LineDraft(price.id, spec.key, used, amount, dims))
    for price in prices:
        if not lines[price.id]:
            dims = dict(price.dimensions) if price.dimensions else None
            lines[price.id].append(LineDraft(price.id, spec.key, 0, usage_amount(price, 0), dims))
    return lines


def _spec(meter: MeterSpec, prices: Iterable[PriceTerms]) -> MeterSpec:
    """The metric's meter, grouped by its `group_by` then any other property a price names."""
    named = {name for price in prices for name in price.dimensions or {}}
    extra = sorted(named - set(meter.group_by))
    return replace(meter, group_by=(*meter.group_by, *extra)) if extra else meter


def _gaps(start: datetime, end: datetime, stretches: Sequence[Stretch]) -> list[Stretch]:
    """The parts of `[start, end)` no stretch (ordered) covers."""
    gaps, cursor = [], start
    for stretch in stretches:
        if stretch.start > cursor:
            gaps.append(Stretch(cursor, stretch.start))
        cursor = max(cursor, stretch.end)
    if cursor < end:
        gaps.append(Stretch(cursor, end))
    return gaps


def _unique_count(
    session: Session, tenant_id: str, spec: MeterSpec, values: Values, stretches: Sequence[Stretch]
) -> int:
    """One group's `unique_count` over the metric's events in `stretches`, in one SQL
    statement: a value seen in two stretches counts once."""
    events = [
        UsageEvent.tenant_id == tenant_id,
        UsageEvent.metric == spec.key,
        or_(*(and_(UsageEvent.at_ts >= s.start, UsageEvent.at_ts < s.end) for s in stretches)),
        *_in_group(spec, values),
    ]
    row = session.execute(grouped_quantities(spec, *events)).one()  # the group has events
    return int(row[len(spec.group_by)])


def _unpriced(
    session: Session,
    tenant_id: str,
    specs: dict[str, MeterSpec],
    leftovers: dict[tuple[str, Values], list[tuple[Stretch, int]]],
) -> list[LineDraft]:
    lines = []
    for (metric, values), parts in sorted(leftovers.items(), key=lambda item: _order(item[0])):
        spec = specs[metric]
        used = _combined(session, tenant_id, spec, values, parts)
        if used > 0:
            dims = dict(zip(spec.group_by, values, strict=True)) if spec.group_by else None
            lines.append(LineDraft(None, metric, used, 0, dims))
    return lines


def _combined(
    session: Session,
    tenant_id: str,
    spec: MeterSpec,
    values: Values,
    parts: list[tuple[Stretch, int]],
) -> int:
    """One group's quantity over several stretches, from each stretch's quantity (a
    `unique_count` is counted again)."""
    quantities = [used for _, used in parts]
    if len(parts) == 1 or spec.aggregation in ("sum", "count"):
        return sum(quantities)
    if spec.aggregation == "max":
        return max(quantities)
    if spec.aggregation == "latest":
        return quantities[-1]
    return _unique_count(session, tenant_id, spec, values, [stretch for stretch, _ in parts])


def _in_group(spec: MeterSpec, values: Values) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    for name, value in zip(spec.group_by, values, strict=True):
        text = _property_text(name)
        if value is None:
            conditions.append(text.is_(None))
        else:
            conditions.append(func.substr(text, 1, GROUP_VALUE_LENGTH) == value)
    return conditions


def _order(key: tuple[str, Values]) -> tuple[str, tuple[tuple[bool, str], ...]]:
    metric, values = key
    return metric, _values_order(values)


def _values_order(values: Values) -> tuple[tuple[bool, str], ...]:
    """Groups in a stable order: by value, a missing value first."""
    return tuple((value is not None, value or "") for value in values)
