"""What an invoice reads of the ledger, in two statements whatever its metrics and plans:

- `meters_in_use`: the metrics the tenant used in the period or has prices for, each with its
  meter (one SELECT: the used metrics joined with their meters);
- `period_quantities`: every metric's quantity per stretch of the period and per group, in one
  GROUP BY over (metric, stretch, group values) — plus one window query beside it for the
  metrics whose meter is `latest` (the last event of each group is not an aggregate).

Each metric groups by its own properties: group column i is the i-th property of the row's
metric (`CASE metric WHEN … THEN …`), NULL past its last. The quantities are those
`billing.meters.grouped_quantities` gives one metric and stretch at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    any_,
    bindparam,
    case,
    distinct,
    func,
    literal,
    literal_column,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from billing import driver_sql
from billing.meters import GROUP_VALUE_LENGTH, MeterSpec, property_text
from billing.models import Meter, UsageEvent

Values = tuple[str | None, ...]
Quantities = dict[tuple[int, str], dict[Values, int]]
"""(stretch index, metric) → group values → quantity; groups without events are absent."""


def meters_in_use(
    session: Session, tenant_id: str, start: datetime, end: datetime, priced: Iterable[str]
) -> dict[str, MeterSpec]:
    """The meter of each metric the tenant used in `[start, end)` or that is in `priced`
    (a `sum` meter where none was declared), by key."""
    wanted = sorted(set(priced))
    bounds = {"tenant_id": tenant_id, "start": start, "end": end, "wanted": wanted}
    specs = {key: MeterSpec(key) for key in wanted}
    for key, aggregation, prop, group_by in driver_sql.read(
        session, *_METERS[bool(wanted)], bounds
    ):
        if aggregation is not None:
            specs[key] = MeterSpec(key, aggregation, prop, tuple(group_by))
        else:
            specs.setdefault(key, MeterSpec(key))
    return specs


# Read for every invoice: built once (the priced metrics are one expanding parameter).
_USED = (
    select(UsageEvent.metric.label("key"))
    .where(
        UsageEvent.tenant_id == bindparam("tenant_id"),
        UsageEvent.at_ts >= bindparam("start"),
        UsageEvent.at_ts < bindparam("end"),
    )
    .distinct()
    .subquery()
)
_METER_COLUMNS = (Meter.aggregation, Meter.property, Meter.group_by)
_METERS_USED = select(_USED.c.key, *_METER_COLUMNS).outerjoin(Meter, Meter.key == _USED.c.key)
_METERS_USED_OR_PRICED = union_all(
    _METERS_USED,
    select(Meter.key, *_METER_COLUMNS).where(Meter.key.in_(bindparam("wanted", expanding=True))),
)
_METERS_USED_OR_PRICED_PG = union_all(  # the priced metrics as one array, for the driver
    _METERS_USED,
    select(Meter.key, *_METER_COLUMNS).where(
        Meter.key == any_(bindparam("wanted", type_=ARRAY(String())))
    ),
)
#: By whether metrics are priced: the statement, and its SQL for the driver's cursor.
_METERS = {
    False: (_METERS_USED, driver_sql.compiled(_METERS_USED)),
    True: (_METERS_USED_OR_PRICED, driver_sql.compiled(_METERS_USED_OR_PRICED_PG)),
}


def period_quantities(
    session: Session,
    tenant_id: str,
    stretches: Sequence[tuple[datetime, datetime]],
    specs: Sequence[MeterSpec],
) -> Quantities:
    """Each metric's quantity per group in each of `stretches` (`[start, end)`, not
    overlapping, ordered): one GROUP BY, and one window query for `latest` meters.

    Both statements are built once per set of meters and number of stretches (`_Shape`,
    cached), the tenant and the instants being their parameters."""
    found: Quantities = {}
    if not stretches:
        return found
    bounds: dict[str, Any] = {
        "tenant_id": tenant_id,
        "first": min(start for start, _ in stretches),
        "last": max(end for _, end in stretches),
    }
    for index, (start, end) in enumerate(stretches):
        bounds[f"start_{index}"], bounds[f"end_{index}"] = start, end
    aggregated = tuple(spec for spec in specs if spec.aggregation != "latest")
    latest = tuple(spec for spec in specs if spec.aggregation == "latest")
    if aggregated:
        _grouped(session, _shape(aggregated, len(stretches)), bounds, found)
    if latest:
        _last_events(session, _shape(latest, len(stretches)), bounds, found)
    return found


@functools.lru_cache(maxsize=256)
def _shape(specs: tuple[MeterSpec, ...], stretches: int) -> _Shape:
    return _Shape(specs, stretches)


class _Shape:
    """The columns and conditions both queries share: metric, stretch index, group values;
    bound by `tenant_id`, `first` and `last` (the period) and `start_i`, `end_i` (stretch i)."""

    def __init__(self, specs: Sequence[MeterSpec], stretches: int) -> None:
        self.specs = {spec.key: spec for spec in specs}
        self.stretch = case(
            *(
                (
                    and_(
                        UsageEvent.at_ts >= bindparam(f"start_{index}"),
                        UsageEvent.at_ts < bindparam(f"end_{index}"),
                    ),
                    index,
                )
                for index in range(stretches)
            )
        )
        width = max(len(spec.group_by) for spec in specs)
        self.groups = [
            case(
                *(
                    (UsageEvent.metric == spec.key, _value(spec.group_by[position]))
                    for spec in specs
                    if len(spec.group_by) > position
                )
            )
            for position in range(width)
        ]
        self.where = [
            UsageEvent.tenant_id == bindparam("tenant_id"),
            UsageEvent.metric.in_(sorted(self.specs)),
            UsageEvent.at_ts >= bindparam("first"),
            UsageEvent.at_ts < bindparam("last"),
        ]
        self.unique = [
            key for key, spec in self.specs.items() if spec.aggregation == "unique_count"
        ]
        self.grouped = (self._grouped(), driver_sql.compiled(self._grouped(postgresql=True)))
        self.last_events = self._last_events()

    @property
    def keys(self) -> list[Any]:
        return [UsageEvent.metric, self.stretch, *self.groups]

    def store(self, found: Quantities, row: Sequence[Any], quantity: int) -> None:
        metric, stretch, *values = row[: 2 + len(self.groups)]
        if stretch is not None:
            width = len(self.specs[metric].group_by)
            found.setdefault((int(stretch), metric), {})[tuple(values[:width])] = quantity

    def _grouped(self, *, postgresql: bool = False) -> Any:
        """The GROUP BY. Its sum is two columns, high and low, that `_grouped` adds up. On
        SQLite, the sums of each amount's quotient and remainder by 2**32: its sum() of the
        amounts fails past 2**63-1 with a bare `integer overflow`, and this way the invoice is
        refused naming its line, as on PostgreSQL. On PostgreSQL (`postgresql`), whose sum of
        bigints is exact, 0 and the sum; the metrics are one array literal there, not an IN
        list SQLAlchemy expands per execution, so that it compiles once for the driver."""
        distinct_counts = [
            func.count(distinct(property_text(self.specs[key].property or "")))
            for key in self.unique
        ]
        amount, where = UsageEvent.amount, self.where
        if postgresql:
            metrics = literal(sorted(self.specs), ARRAY(String()))
            where = [where[0], UsageEvent.metric == any_(metrics), *where[2:]]
            halves = [literal_column("0"), func.sum(amount)]
        else:
            halves = [func.sum(amount // _LOW), func.sum(amount % _LOW)]
        measures = [*halves, func.count(), func.max(amount)]
        keys = self.keys
        return select(*keys, *measures, *distinct_counts).where(*where).group_by(*keys)

    def _last_events(self) -> Any:
        keys = self.keys
        rank = func.row_number().over(
            partition_by=keys, order_by=(UsageEvent.at_ts.desc(), UsageEvent.amount.desc())
        )
        labelled = [key.label(f"k{index}") for index, key in enumerate(keys)]
        ranked = select(*labelled, UsageEvent.amount, rank.label("rank")).where(*self.where)
        last = ranked.subquery()
        columns = [last.c[f"k{index}"] for index in range(len(keys))]
        return select(*columns, last.c.amount).where(last.c.rank == 1)


def _grouped(session: Session, shape: _Shape, bounds: dict[str, Any], found: Quantities) -> None:
    width = len(shape.keys)
    for row in driver_sql.read(session, *shape.grouped, bounds):
        spec = shape.specs[row[0]]
        if spec.aggregation == "sum":
            quantity = int(row[width] or 0) * _LOW + int(row[width + 1] or 0)
        elif spec.aggregation == "unique_count":
            quantity = int(row[width + 4 + shape.unique.index(spec.key)])
        else:
            quantity = int(row[width + ("count", "max").index(spec.aggregation) + 2] or 0)
        shape.store(found, row, quantity)


def _last_events(
    session: Session, shape: _Shape, bounds: dict[str, Any], found: Quantities
) -> None:
    width = len(shape.keys)
    for row in session.execute(shape.last_events, bounds):
        shape.store(found, row, int(row[width] or 0))


_LOW = 2**32
"""The GROUP BY's sum on SQLite is Σ(amount // 2**32) × 2**32 + Σ(amount % 2**32): an amount
(0 to 2**63-1) adds under 2**31 to the first part and under 2**32 to the second, so neither
nears 2**63 before two billion events."""


def _value(name: str) -> ColumnElement[str]:
    return func.substr(property_text(name), 1, GROUP_VALUE_LENGTH)
