"""Plans as code: the catalogue (plans, their prices and entitlements) kept in a reviewed file.

```yaml
plans:
  - key: pro
    name: Pro
    entitlements:
      - {key: reports, limit_per_window: 100, window: day}
    prices:
      - {key: pro-fee, currency: usd, unit_amount: 3100, recurring_interval: month}
      - {key: pro-tokens, currency: usd, metric: tokens, unit_amount_decimal: "0.0002"}
```

`load_catalog(text, source)` validates a document: errors name the file, the entry and the field
(`CatalogError`). `plan_changes(session, catalog)` compares it with the database and
`apply_changes(session, changes)` makes the changes (the caller commits); applying the same
file again finds none. `export_catalog(session)` writes the database's catalogue in the same
format, so an export applied elsewhere reproduces it.

A price's amounts are history once billed: a price that an invoice bills (any but a void one:
a paid invoice's late usage is still priced with its terms), or that a live subscription's plan
holds, is not rewritten. It gets a new version instead: the old row keeps its id and amounts
(invoice lines keep pointing at it, and late usage of their periods is priced with it:
`billing.adjustments`), leaves the plan and is renamed `KEY@vN`, and a new row takes the key,
billed from the next invoice on. `POST /_billing/prices` does the same (`store_price`). A price
nothing uses is updated in place. Plans and prices absent from the file are left alone (and
reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.api.schemas import (
    MAX_BIGINT,
    MAX_PRICE_KEY,
    Count,
    DecimalAmount,
    Description,
    Dimensions,
    Key,
    Metric,
    Name,
    TierIn,
    Window,
)
from billing.errors import CatalogError, PriceDefinitionError
from billing.models import Invoice, InvoiceLine, Plan, PlanEntitlement, Price, Subscription
from billing.pricing import parse_tiers

PRICE_FIELDS = (
    "currency",
    "metric",
    "unit_amount",
    "unit_amount_decimal",
    "recurring_interval",
    "billing_scheme",
    "tiers_mode",
    "tiers",
    "transform_divide_by",
    "transform_round",
    "dimensions",
)
"""What a price bills: a change to any of these (or to its plan) is a change of price."""


def _no_float(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError("write decimal amounts as strings ('0.0002'): floats are inexact")
    return value


Decimal_ = Annotated[DecimalAmount, BeforeValidator(_no_float)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogEntitlement(_Entry):
    """How much of `key` the plan allows per day or month of the tenant's time zone."""

    key: Key
    limit_per_window: Count
    window: Window


class CatalogTier(TierIn):
    """A tier of a tiered price (decimal amounts as strings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    unit_amount_decimal: Decimal_ = "0"


class CatalogPrice(_Entry):
    """A price of the plan it is listed under; the fields of `POST /_billing/prices`."""

    key: Annotated[str, Field(min_length=1, max_length=MAX_PRICE_KEY, pattern=r"^[^@\s]+$")]
    currency: Annotated[str, Field(pattern=r"^[A-Za-z]{3}$")]
    metric: Metric | None = None
    unit_amount: Count | None = None
    unit_amount_decimal: Decimal_ | None = None
    recurring_interval: Literal["month"] | None = None
    billing_scheme: Literal["per_unit", "tiered"] = "per_unit"
    tiers_mode: Literal["graduated", "volume"] | None = None
    tiers: list[CatalogTier] | None = Field(default=None, max_length=100)
    transform_divide_by: Annotated[int, Field(ge=1, le=MAX_BIGINT, strict=True)] | None = None
    transform_round: Literal["up", "down"] | None = None
    dimensions: Dimensions | None = None

    @model_validator(mode="after")
    def _billable(self) -> CatalogPrice:
        if self.billing_scheme == "per_unit":
            if self.unit_amount is None and self.unit_amount_decimal is None:
                raise ValueError("a per_unit price needs unit_amount or unit_amount_decimal")
            if self.tiers or self.tiers_mode:
                raise ValueError("tiers belong to tiered prices only")
            return self
        if self.metric is None:
            raise ValueError("a tiered price bills a metric")
        if self.tiers_mode is None:
            raise ValueError("a tiered price needs tiers_mode graduated or volume")
        try:
            parse_tiers([tier.model_dump() for tier in self.tiers or []])
        except PriceDefinitionError as error:
            raise ValueError(str(error)) from error
        return self

    def fields(self) -> dict[str, Any]:
        """What it bills, as `_stored_fields` reads a row."""
        values = self.model_dump(include=set(PRICE_FIELDS))
        values["currency"] = self.currency.lower()
        values["unit_amount_decimal"] = _plain(self.unit_amount_decimal)
        values["tiers"] = _tiers(values["tiers"])
        return values


class CatalogPlan(_Entry):
    """A plan with its whole set of entitlements and its prices."""

    key: Key
    name: Name
    description: Description | None = None
    entitlements: list[CatalogEntitlement] = Field(default_factory=list, max_length=100)
    prices: list[CatalogPrice] = Field(default_factory=list, max_length=1000)


class Catalog(_Entry):
    """Plans, each key once; price keys unique across plans."""

    plans: list[CatalogPlan] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        for kind, keys in (
            ("plan", [plan.key for plan in self.plans]),
            ("price", [price.key for plan in self.plans for price in plan.prices]),
        ):
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            if repeated:
                raise ValueError(f"{kind} key {repeated[0]!r} is listed twice")
        return self


# --- loading --------------------------------------------------------------------------------


def load_catalog(text: str, source: str) -> Catalog:
    """Parse and validate a catalogue document; `source` names it in errors.

    Raises:
        CatalogError: not YAML, or an entry breaks a rule (the message names the file, the
            entry and the field); permanent.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not YAML"
        raise CatalogError(f"{source}:{where} {problem}", source=source) from None
    try:
        return Catalog.model_validate(document if document is not None else {})
    except ValidationError as error:
        first = error.errors()[0]
        entry, field = _locate(document, first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise CatalogError(
            f"{source}: {entry or 'the document'}: {field + ': ' if field else ''}{message}",
            source=source,
            entry=entry,
            field=field,
        ) from None


LISTS = {"plans": "plan", "prices": "price", "entitlements": "entitlement"}


def _locate(document: Any, loc: tuple[int | str, ...]) -> tuple[str, str]:
    """The entry (`plan 'pro', price 'pro-fee'`) and the field a validation error points at."""
    entry: list[str] = []
    node = document
    path = list(loc)
    while path:
        step = path[0]
        if step in LISTS and len(path) > 1 and isinstance(path[1], int):
            items = node.get(step) if isinstance(node, dict) else None
            index = int(path[1])
            node = items[index] if isinstance(items, list) and index < len(items) else None
            key = node.get("key") if isinstance(node, dict) else None
            label = repr(key) if isinstance(key, str) else f"#{index + 1}"
            entry.append(f"{LISTS[step]} {label}")
            path = path[2:]
            continue
        break
    field = ".".join(str(step) for step in path)
    return ", ".join(entry), field


# --- comparing and applying -----------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between the file and the database, and how it is made."""

    action: Literal["create", "update", "version", "absent"]
    kind: Literal["plan", "price"]
    key: str
    detail: str = ""
    plan: CatalogPlan | None = None
    price: CatalogPrice | None = None

    def describe(self) -> str:
        """One line for `--dry-run` and the apply report."""
        sign = {"create": "+", "update": "~", "version": "~", "absent": "?"}[self.action]
        return f"{sign} {self.kind} {self.key}{': ' + self.detail if self.detail else ''}"


def plan_changes(session: Session, catalog: Catalog, *, now: datetime) -> list[Change]:
    """What applying `catalog` would change, in the order it is applied; `now` decides which
    subscriptions are live."""
    changes: list[Change] = []
    plans = {plan.key: plan for plan in session.scalars(select(Plan))}
    prices = {price.key: price for price in session.scalars(select(Price))}
    for entry in catalog.plans:
        stored = plans.get(entry.key)
        if stored is None:
            changes.append(Change("create", "plan", entry.key, _plan_summary(entry), plan=entry))
        else:
            differences = _plan_differences(stored, entry)
            if differences:
                changes.append(Change("update", "plan", entry.key, differences, plan=entry))
        for price in entry.prices:
            changes.extend(_price_change(session, prices.get(price.key), entry, price, now))
    listed_plans = {plan.key for plan in catalog.plans}
    listed_prices = {price.key for plan in catalog.plans for price in plan.prices}
    for key in sorted(set(plans) - listed_plans):
        changes.append(Change("absent", "plan", key, "not in the file: left as it is"))
    for key, row in sorted(prices.items()):
        if key not in listed_prices and row.plan_id is not None:
            changes.append(Change("absent", "price", key, "not in the file: left as it is"))
    return changes


def apply_changes(session: Session, changes: list[Change]) -> int:
    """Make `changes` in `session` (the caller commits); return how many were made."""
    made = 0
    for change in changes:
        if change.kind == "plan" and change.plan is not None:
            _put_plan(session, change.plan)
        elif change.kind == "price" and change.plan is not None and change.price is not None:
            plan_id = _put_plan(session, change.plan, only_if_missing=True)
            if change.action == "version":
                _retire(session, change.price.key)
            _put_price(session, plan_id, change.price)
        else:
            continue
        made += 1
        session.flush()
    return made


def _price_change(
    session: Session, row: Price | None, plan: CatalogPlan, entry: CatalogPrice, now: datetime
) -> list[Change]:
    wanted = entry.fields()
    if row is None:
        return [Change("create", "price", entry.key, _price_summary(plan, wanted), plan, entry)]
    stored = _stored_fields(row)
    plan_row = row.plan
    differences = [
        f"{name} {_shown(stored[name])} → {_shown(wanted[name])}"
        for name in PRICE_FIELDS
        if stored[name] != wanted[name]
    ]
    if plan_row is None or plan_row.key != plan.key:
        differences.append(f"plan {plan_row.key if plan_row else '-'} → {plan.key}")
    if not differences:
        return []
    detail = ", ".join(differences)
    used_by = _in_use(session, row, now)
    if used_by is None:
        return [Change("update", "price", entry.key, detail, plan, entry)]
    detail += f"; a new version ({used_by}; the old one is kept as {_next_version(session, row)})"
    return [Change("version", "price", entry.key, detail, plan, entry)]


def _in_use(session: Session, price: Price, now: datetime) -> str | None:
    """Why `price` can't be rewritten, or None."""
    billed = session.scalar(
        select(Invoice.status)
        .join(InvoiceLine, Invoice.id == InvoiceLine.invoice_id)
        .where(InvoiceLine.price_id == price.id, Invoice.status != "void")
        .limit(1)
    )
    if billed is not None:
        return f"a{'n' if billed[0] in 'aeiou' else ''} {billed} invoice bills it"
    if price.plan_id is not None:
        live = session.scalar(
            select(Subscription.id)
            .where(
                Subscription.plan_id == price.plan_id,
                (Subscription.ended_at.is_(None)) | (Subscription.ended_at > now),
            )
            .limit(1)
        )
        if live is not None:
            return "a live subscription's plan holds it"
    return None


def store_price(session: Session, stored: Price, wanted: Price, *, now: datetime) -> Price:
    """The row that bills `wanted`'s plan and terms from now on, for `stored` (the row of its
    key; `wanted` a new row, not added): `stored` as it is when nothing differs, changed in
    place when nothing uses it, else `wanted` added as its new version (`stored` kept as
    `KEY@vN`, off its plan, as `apply_changes` does). `now` decides which subscriptions are
    live."""
    if _stored_fields(stored) == _stored_fields(wanted) and stored.plan_id == wanted.plan_id:
        return stored
    if _in_use(session, stored, now) is None:
        for name in (*PRICE_FIELDS, "plan_id"):
            setattr(stored, name, getattr(wanted, name))
        return stored
    _retire(session, stored.key)
    session.add(wanted)
    return wanted


def _next_version(session: Session, price: Price) -> str:
    """`KEY@vN` for the next N: one past the highest taken (any key `KEY@v<digits>`)."""
    prefix = f"{price.key}@v"
    keys = session.scalars(select(Price.key).where(Price.key.startswith(prefix, autoescape=True)))
    numbers = (key.removeprefix(prefix) for key in keys)
    taken = [int(number) for number in numbers if number.isascii() and number.isdigit()]
    return f"{prefix}{max(taken, default=0) + 1}"


def _retire(session: Session, key: str) -> None:
    row = session.scalars(select(Price).where(Price.key == key)).one()
    row.key = _next_version(session, row)
    row.plan_id = None
    session.flush()


def _put_plan(session: Session, entry: CatalogPlan, *, only_if_missing: bool = False) -> str:
    plan = session.scalars(select(Plan).where(Plan.key == entry.key)).one_or_none()
    if plan is not None and only_if_missing:
        return plan.id
    if plan is None:
        plan = Plan(key=entry.key, name=entry.name)
        session.add(plan)
    plan.name, plan.description = entry.name, entry.description
    session.flush()
    wanted: dict[tuple[str, str], int] = {
        (e.key, e.window): e.limit_per_window for e in entry.entitlements
    }
    for stored in list(
        session.scalars(select(PlanEntitlement).where(PlanEntitlement.plan_id == plan.id))
    ):
        limit = wanted.pop((stored.key, stored.window), None)
        if limit is None:
            session.delete(stored)
        else:
            stored.limit_per_window = limit
    for (key, window), limit in wanted.items():
        session.add(
            PlanEntitlement(plan_id=plan.id, key=key, window=window, limit_per_window=limit)
        )
    return plan.id


def _put_price(session: Session, plan_id: str, entry: CatalogPrice) -> None:
    price = session.scalars(select(Price).where(Price.key == entry.key)).one_or_none()
    if price is None:
        price = Price(key=entry.key)
        session.add(price)
    values = entry.fields()
    decimal = values.pop("unit_amount_decimal")
    for name, value in values.items():
        setattr(price, name, value)
    price.unit_amount_decimal = Decimal(decimal) if decimal is not None else None
    price.plan_id = plan_id


def _plan_differences(plan: Plan, entry: CatalogPlan) -> str:
    differences = []
    if plan.name != entry.name:
        differences.append(f"name {_shown(plan.name)} → {_shown(entry.name)}")
    if plan.description != entry.description:
        differences.append("description")
    stored = sorted((e.key, e.window, e.limit_per_window) for e in plan.entitlements)
    wanted = sorted((e.key, e.window, e.limit_per_window) for e in entry.entitlements)
    if stored != wanted:
        differences.append(f"entitlements {_entitlements(stored)} → {_entitlements(wanted)}")
    return ", ".join(differences)


def _entitlements(rows: Sequence[tuple[str, str, int]]) -> str:
    return "[" + ", ".join(f"{key} {limit}/{window}" for key, window, limit in rows) + "]"


def _plan_summary(entry: CatalogPlan) -> str:
    rows = sorted((e.key, e.window, e.limit_per_window) for e in entry.entitlements)
    return f"{_shown(entry.name)}, entitlements {_entitlements(rows)}"


def _price_summary(plan: CatalogPlan, fields: dict[str, Any]) -> str:
    shown = ", ".join(
        f"{name} {_shown(value)}" for name, value in fields.items() if value is not None
    )
    return f"plan {plan.key}, {shown}"


def _stored_fields(price: Price) -> dict[str, Any]:
    values = {name: getattr(price, name) for name in PRICE_FIELDS}
    values["unit_amount_decimal"] = _plain(price.unit_amount_decimal)
    values["tiers"] = _tiers(price.tiers)
    return values


def _plain(value: Decimal | str | None) -> str | None:
    if value is None:
        return None
    return format(Decimal(value).normalize(), "f")


def _tiers(tiers: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tiers:
        return None
    return [
        {
            "up_to": tier.get("up_to"),
            "unit_amount_decimal": _plain(tier.get("unit_amount_decimal", "0")),
            "flat_amount": tier.get("flat_amount") or 0,
        }
        for tier in tiers
    ]


def _shown(value: object) -> str:
    if isinstance(value, list):  # tiers
        return "[" + "; ".join(_tier(tier) for tier in value) + "]"
    return "-" if value is None else str(value)


def _tier(tier: dict[str, Any]) -> str:
    upto = "rest" if tier["up_to"] is None else f"up to {tier['up_to']}"
    return f"{upto} at {tier['unit_amount_decimal']} + {tier['flat_amount']}"


# --- exporting ------------------------------------------------------------------------------


def export_catalog(session: Session) -> str:
    """The database's plans with their entitlements and current prices, as a catalogue
    document (`load_catalog` reads it back)."""
    plans = []
    for plan in session.scalars(select(Plan).order_by(Plan.key)):
        entry: dict[str, Any] = {"key": plan.key, "name": plan.name}
        if plan.description is not None:
            entry["description"] = plan.description
        entry["entitlements"] = [
            {"key": e.key, "limit_per_window": e.limit_per_window, "window": e.window}
            for e in sorted(plan.entitlements, key=lambda e: (e.key, e.window))
        ]
        entry["prices"] = [
            {"key": price.key, **_exported_fields(price)}
            for price in sorted(plan.prices, key=lambda price: price.key)
        ]
        plans.append(entry)
    return str(yaml.safe_dump({"plans": plans}, sort_keys=False, allow_unicode=True))


def _exported_fields(price: Price) -> dict[str, Any]:
    values = _stored_fields(price)
    defaults = {"billing_scheme": "per_unit"}
    return {
        name: value
        for name, value in values.items()
        if value is not None and defaults.get(name) != value
    }
