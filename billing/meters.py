"""Meters: how a metric's events become one quantity per period, computed in SQL.

| aggregation | quantity of a period |
| --- | --- |
| `sum` (default) | sum of `amount` |
| `count` | number of events |
| `max` | largest `amount` |
| `unique_count` | distinct values of `metadata[property]`, as text (absent or null: not counted) |
| `latest` | `amount` of the period's last event by `at` (the larger amount at a tie) |

With `group_by` (metadata property names), each day also gets one aggregate per group of values,
under the same aggregation; the whole metric's row has the empty group.

On an invoice, a metric's quantity is its aggregation over the events of the period, per group
(see `billing.usage_lines`). A plan switch mid-period cuts the period: each subscription bills
the aggregation over the events of its own stretch. So `max` bills each stretch's peak and
`latest` the last value inside each stretch: neither is prorated, nor added up across the
subscriptions, nor billed again by the next one (a peak of 40 seats before the switch and 25
after bills 40 on the old plan and 25 on the new one). A group no price bills is shown once
for the period, its stretches aggregated together.

A metric nobody declared is a `sum`, as before meters existed. Declarations are shared by every
tenant (like plans and prices) and made by operators: `declare_meter(session, key=...)`, or
`POST /_billing/meters` with `billing.admin`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    case,
    cast,
    distinct,
    func,
    literal,
    literal_column,
    null,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from billing.errors import InvalidUsageError, MeterDefinitionError
from billing.ledger import validate_metric
from billing.models import Meter, UsageEvent
from webhooks.sqltypes import utcnow

Aggregation = Literal["sum", "count", "max", "unique_count", "latest"]
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
#: Metadata property names: the JSON path is built from them, so only plain key characters.
PROPERTY_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$"
PROPERTY = re.compile(PROPERTY_PATTERN)
MAX_GROUP_BY = 5
#: Group values are compared on their first characters only (they key an index).
GROUP_VALUE_LENGTH = 100


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """A validated meter: `property` is set for `unique_count` only."""

    key: str
    aggregation: Aggregation = "sum"
    property: str | None = None
    group_by: tuple[str, ...] = ()


def validate_meter(
    *,
    key: object,
    aggregation: object = "sum",
    property: object = None,
    group_by: Iterable[object] | None = None,
) -> MeterSpec:
    """Check a declaration; return it as a `MeterSpec`.

    Raises:
        MeterDefinitionError: a field is malformed (`.field` names it).
    """
    try:
        key = validate_metric(key)
    except InvalidUsageError as error:
        raise MeterDefinitionError(f"key: {error}", field="key") from error
    if aggregation not in AGGREGATIONS:
        raise MeterDefinitionError(
            f"aggregation must be one of {', '.join(AGGREGATIONS)}", field="aggregation"
        )
    if aggregation == "unique_count":
        _check_property(property, "property")
    elif property is not None:
        raise MeterDefinitionError("only a unique_count meter reads a property", field="property")
    names = list(group_by or ())
    for index, name in enumerate(names):
        _check_property(name, f"group_by[{index}]")
    if len(set(names)) != len(names) or len(names) > MAX_GROUP_BY:
        raise MeterDefinitionError(
            f"group_by names up to {MAX_GROUP_BY} distinct properties", field="group_by"
        )
    return MeterSpec(key, aggregation, property, tuple(names))  # type: ignore[arg-type]


def _check_property(name: object, field: str) -> None:
    if not isinstance(name, str) or not PROPERTY.match(name):
        raise MeterDefinitionError(
            f"{field} must be a metadata key: letters, digits, '_', '.', ':' or '-' (up to 100)",
            field=field,
        )


def declare_meter(
    session: Session,
    *,
    key: str,
    aggregation: str = "sum",
    property: str | None = None,
    group_by: Iterable[str] | None = None,
) -> MeterSpec:
    """Create or replace the meter of metric `key` (an upsert); return it.

    The next aggregation of a day uses it; days already aggregated keep their totals until
    they are aggregated again.

    Raises:
        MeterDefinitionError: a field is malformed; nothing is stored.
    """
    spec = validate_meter(key=key, aggregation=aggregation, property=property, group_by=group_by)
    values = {
        "key": spec.key,
        "aggregation": spec.aggregation,
        "property": spec.property,
        "group_by": list(spec.group_by),
    }
    dialect = session.get_bind().dialect.name
    insert: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Meter)
    session.execute(
        insert.values(**values, created_at=utcnow()).on_conflict_do_update(
            index_elements=["key"], set_=values
        )
    )
    session.expire_all()
    return spec


def get_meter(session: Session, key: str) -> MeterSpec:
    """The meter of metric `key`; a `sum` meter when none was declared (one Core SELECT)."""
    row = session.execute(_METER.where(Meter.key == key)).one_or_none()
    if row is None:
        return MeterSpec(key)
    return MeterSpec(key, row.aggregation, row.property, tuple(row.group_by))


_METER = select(Meter.aggregation, Meter.property, Meter.group_by)


def list_meters(session: Session) -> list[MeterSpec]:
    """Every declared meter, by key."""
    return [_spec(row) for row in session.execute(select(Meter).order_by(Meter.key)).scalars()]


def _spec(row: Meter) -> MeterSpec:
    return MeterSpec(row.key, row.aggregation, row.property, tuple(row.group_by))  # type: ignore[arg-type]


def quantity(spec: MeterSpec, *where: ColumnElement[bool]) -> ColumnElement[int]:
    """A scalar SQL expression: the meter's quantity over the events matching `where` (0: none)."""
    events = select().select_from(UsageEvent).where(*where)
    if spec.aggregation == "latest":
        last = events.add_columns(UsageEvent.amount).order_by(
            UsageEvent.at_ts.desc(), UsageEvent.amount.desc()
        )
        # LIMIT 1 in the SQL, not a parameter: PostgreSQL plans a prepared statement's generic
        # plan for a parameter LIMIT as a tenth of the rows and, finding it dearer, plans the
        # statement again at each run (0.3 ms, twice the upsert's execution)
        return func.coalesce(last.limit(literal_column("1", Integer())).scalar_subquery(), 0)
    return func.coalesce(events.add_columns(_aggregate(spec)).scalar_subquery(), 0)


def _aggregate(spec: MeterSpec) -> ColumnElement[Any]:
    if spec.aggregation == "count":
        return func.count()
    if spec.aggregation == "max":
        return func.max(UsageEvent.amount)
    if spec.aggregation == "unique_count":
        return func.count(distinct(property_text(spec.property or "")))
    return func.sum(UsageEvent.amount)


def grouped_quantities(spec: MeterSpec, *where: ColumnElement[bool]) -> Select[Any]:
    """A SELECT of one row per group of the events matching `where`: the group's values (text,
    cut to `GROUP_VALUE_LENGTH` characters; NULL when absent) then its quantity."""
    keys = [func.substr(property_text(name), 1, GROUP_VALUE_LENGTH) for name in spec.group_by]
    labelled = [key.label(f"g{index}") for index, key in enumerate(keys)]
    if spec.aggregation != "latest":
        return select(*labelled, _aggregate(spec)).where(*where).group_by(*keys)
    rank = func.row_number().over(
        partition_by=keys, order_by=(UsageEvent.at_ts.desc(), UsageEvent.amount.desc())
    )
    ranked = select(*labelled, UsageEvent.amount, rank.label("rank")).where(*where).subquery()
    columns = [ranked.c[f"g{index}"] for index in range(len(keys))]
    return select(*columns, ranked.c.amount).where(ranked.c.rank == 1)


def group_key(names: Sequence[str], values: Sequence[str | None]) -> str:
    """The stored form of a group: compact JSON with sorted keys; "" for the whole metric."""
    if not names:
        return ""
    return json.dumps(
        dict(zip(names, values, strict=True)),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def property_text(name: str) -> ColumnElement[str]:
    """`metadata[name]` as text, the same on SQLite and PostgreSQL: what PostgreSQL's json `->>`
    gives (a string unquoted, `true`/`false`, a number as written, an object or array as its
    compact JSON; NULL when absent or JSON null). Every grouping, match and count of a property
    reads it through here, so both databases bill a value alike."""
    return _PropertyText(name)


class _PropertyText(FunctionElement[str]):
    """`property_text`: its PostgreSQL then its SQLite expression, one compiled per dialect (built
    once, so the SELECT and GROUP BY of one key render the same parameters)."""

    type = String()
    inherit_cache = True

    def __init__(self, name: str) -> None:
        postgresql_text = cast(UsageEvent.metadata_json[name].as_string(), String)
        super().__init__(postgresql_text, _sqlite_text(name))


def _sqlite_text(name: str) -> ColumnElement[str]:
    # json_extract gives 1/0 for true/false and re-formats numbers (1e+16 -> 1.0e+16); `->`
    # (SQLite 3.38+) gives a value's JSON text: numbers as written, objects and arrays minified
    # (PostgreSQL's too, the ledger storing metadata compact). A string is read unquoted and
    # JSON null is NULL, as `->>` has them on PostgreSQL.
    metadata = UsageEvent.metadata_json
    path = literal(f'$."{name}"', String())
    return case(
        {"text": func.json_extract(metadata, path, type_=String()), "null": null()},
        value=func.json_type(metadata, path),
        else_=metadata.op("->", return_type=String())(path),
    )


@compiles(_PropertyText)
def _property_text_postgresql(element: _PropertyText, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses.clauses[0], **kw))


@compiles(_PropertyText, "sqlite")
def _property_text_sqlite(element: _PropertyText, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses.clauses[1], **kw))
