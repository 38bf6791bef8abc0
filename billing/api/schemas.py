"""Request and response bodies of the `/_billing` API (pydantic v2).

Inputs are bounded so the database never sees a value it cannot store: text lengths match the
columns, no NUL characters, amounts fit a BIGINT, datetimes are aware and converted to UTC.
Money is integer minor units, or a decimal string where a unit price is finer than that.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    StringConstraints,
    WithJsonSchema,
    model_serializer,
)

from billing.ledger import MAX_METRIC_LENGTH, METRIC_PATTERN
from billing.meters import GROUP_VALUE_LENGTH, MAX_GROUP_BY, PROPERTY_PATTERN

MAX_BIGINT = 2**63 - 1
MAX_BATCH = 1000
#: Path ids: our UUIDs (anything else is a 422, not a lookup).
ResourceId = r"^[0-9A-Za-z-]{1,36}$"

# At least one non-space character, and no NUL (PostgreSQL text cannot hold it).
_TEXT_PATTERN = r"^[^\x00]*[^\s\x00][^\x00]*$"


def _text(max_length: int) -> Any:
    return StringConstraints(min_length=1, max_length=max_length, pattern=_TEXT_PATTERN)


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as error:
        raise ValueError("datetime is out of range once converted to UTC") from error


TenantId = Annotated[str, _text(64)]
#: A metric name to record or price: 1-100 of `billing.ledger.METRIC_CHARSET`.
Metric = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_METRIC_LENGTH, pattern=METRIC_PATTERN)
]
#: A metric name to look up: also names stored before the charset was enforced.
StoredMetric = Annotated[str, _text(MAX_METRIC_LENGTH)]
Key = Annotated[str, _text(100)]
#: Longest price key: room for the `@vN` suffix of its old versions (`billing.catalog`).
MAX_PRICE_KEY = 90
#: A price's key: as in a catalogue, room left for the `@vN` of its old versions, no `@`.
PriceKey = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=MAX_PRICE_KEY, pattern=r"^[^\x00@]*[^\s\x00@][^\x00@]*$"
    ),
]
Name = Annotated[str, _text(200)]
IdempotencyKey = Annotated[str, _text(255)]
Description = Annotated[str, StringConstraints(max_length=10_000, pattern=r"^[^\x00]*$")]
UTCInstant = Annotated[AwareDatetime, AfterValidator(_to_utc)]
Count = Annotated[int, Field(ge=0, le=MAX_BIGINT, strict=True)]
#: A non-negative decimal string that fits NUMERIC(30, 12), e.g. "0.0002" (minor units).
DecimalAmount = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,18}(\.[0-9]{1,12})?$")]
Window = Literal["day", "month"]
#: A price's dimensions: metadata property → value (`billing.dimensions` checks the rest).
Dimensions = Annotated[
    dict[
        Annotated[str, StringConstraints(pattern=PROPERTY_PATTERN)],
        Annotated[str, StringConstraints(min_length=1, max_length=GROUP_VALUE_LENGTH)],
    ],
    Field(min_length=1, max_length=MAX_GROUP_BY),
]
Granularity = Literal["day", "month"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- usage ---------------------------------------------------------------------------------


class UsageIn(_In):
    """One usage event; `at` defaults to the time the server receives it."""

    metric: Metric
    amount: Count
    at: UTCInstant | None = None
    idempotency_key: IdempotencyKey
    metadata: dict[str, JsonValue] | None = None


class UsageRecorded(BaseModel):
    """The stored event's id; `duplicate` when it had been recorded before."""

    id: str
    duplicate: bool = False


#: Batch events are parsed one by one (a bad one is rejected alone), so the list is typed Any
#: and documented as UsageIn, the schema of `POST /usage` in the OpenAPI document.
_USAGE_ITEM_SCHEMA = {"$ref": "#/components/schemas/UsageIn"}


class UsageBatchIn(_In):
    """Up to 1,000 events. Each is checked on its own: a bad one is `rejected` in the results
    and the others are stored, unless `all_or_nothing` asks to store none when any is bad."""

    events: Annotated[
        list[Annotated[Any, WithJsonSchema(_USAGE_ITEM_SCHEMA)]],
        Field(min_length=1, max_length=MAX_BATCH),
    ]
    all_or_nothing: Annotated[bool, Field(strict=True)] = False


class BatchItemError(BaseModel):
    """Why one event of a batch was rejected."""

    status: int
    title: str
    detail: str
    field: str | None = None


class BatchItemResult(BaseModel):
    """The outcome of one event of a batch, at its index."""

    id: str | None = None
    status: Literal["accepted", "duplicate", "rejected"]
    error: BatchItemError | None = None


class UsageBatchOut(BaseModel):
    """One result per event, in the order sent."""

    results: list[BatchItemResult]


class UsagePeriod(BaseModel):
    """The total of one metric over one day or month of the tenant's zone (`period_start` with
    its offset); with `group_by`, of one group of values (`group`, e.g. `{"model": "gpt-4"}`;
    left out otherwise)."""

    period_start: datetime
    granularity: Granularity
    metric: str
    total: int
    group: dict[str, str | None] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_group(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("group") is None:
            data.pop("group", None)
        return data


class UsagePage(BaseModel):
    """Usage totals ordered by `period_start` (then metric); pass `next_cursor` for more."""

    items: list[UsagePeriod]
    next_cursor: str | None = None


# --- plans and prices ----------------------------------------------------------------------


class EntitlementIn(_In):
    """How much of `key` the plan allows per day or month of the tenant's time zone."""

    key: Key
    limit_per_window: Count
    window: Window


class EntitlementOut(BaseModel):
    key: str
    limit_per_window: int
    window: Window


class PlanIn(_In):
    """Creates the plan `key`, or changes its name and description. `entitlements`, when
    given, become the plan's whole set (omit it to leave them as they are)."""

    key: Key
    name: Name
    description: Description | None = None
    entitlements: list[EntitlementIn] | None = Field(default=None, max_length=100)


class TierIn(_In):
    """Units up to `up_to` (null on the last tier) at `unit_amount_decimal`, plus `flat_amount`."""

    up_to: Annotated[int, Field(gt=0, le=MAX_BIGINT, strict=True)] | None = None
    unit_amount_decimal: DecimalAmount = "0"
    flat_amount: Count = 0


class PriceIn(_In):
    """Creates the price `key`, or changes it. A price without `metric` is a fixed fee per
    period; with one it bills that metric's usage `per_unit` or `tiered`."""

    key: PriceKey
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{3}$")]
    plan_key: Key | None = None
    metric: Metric | None = None
    unit_amount: Count | None = None
    unit_amount_decimal: DecimalAmount | None = None
    recurring_interval: Literal["month"] | None = None
    billing_scheme: Literal["per_unit", "tiered"] = "per_unit"
    tiers_mode: Literal["graduated", "volume"] | None = None
    tiers: list[TierIn] | None = Field(default=None, max_length=100)
    transform_divide_by: Annotated[int, Field(ge=1, le=MAX_BIGINT, strict=True)] | None = None
    transform_round: Literal["up", "down"] | None = None
    dimensions: Dimensions | None = None


class PriceOut(BaseModel):
    id: str
    key: str
    currency: str
    plan_id: str | None
    metric: str | None
    unit_amount: int | None
    unit_amount_decimal: str | None
    recurring_interval: str | None
    billing_scheme: str
    tiers_mode: str | None
    tiers: list[dict[str, Any]] | None
    transform_divide_by: int | None
    transform_round: str | None
    created_at: datetime
    dimensions: dict[str, str] | None = None


class PlanOut(BaseModel):
    id: str
    key: str
    name: str
    description: str | None
    created_at: datetime
    entitlements: list[EntitlementOut]
    prices: list[PriceOut]


class PlanList(BaseModel):
    items: list[PlanOut]


# --- meters --------------------------------------------------------------------------------


class MeterIn(_In):
    """Declares how metric `key` aggregates (see `billing.meters`); replaces an earlier one."""

    key: Metric
    aggregation: Literal["sum", "count", "max", "unique_count", "latest"] = "sum"
    property: Annotated[str, StringConstraints(max_length=100)] | None = None
    group_by: Annotated[
        list[Annotated[str, StringConstraints(max_length=100)]], Field(max_length=5)
    ] = []


class MeterOut(BaseModel):
    key: str
    aggregation: str
    property: str | None
    group_by: list[str]


class MeterList(BaseModel):
    items: list[MeterOut]


# --- tenants -------------------------------------------------------------------------------


class TenantIn(_In):
    """The fields to set; those left out keep their value (a new tenant: its id, `UTC`)."""

    name: Name | None = None
    timezone: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, examples=["America/New_York"]
    )


class TenantOut(BaseModel):
    id: str
    name: str
    timezone: str
    created_at: datetime | None


class TenantList(BaseModel):
    items: list[TenantOut]


# --- subscriptions -------------------------------------------------------------------------


class SubscriptionIn(_In):
    """Puts `tenant_id` on `plan_key` from `effective_at` (default: now). A subscription of the
    tenant still open at that time ends then: this is how a plan is changed."""

    tenant_id: TenantId
    plan_key: Key
    effective_at: UTCInstant | None = None
    ended_at: UTCInstant | None = None


class CancelIn(_In):
    """When the subscription ends (default: now)."""

    at: UTCInstant | None = None


class SubscriptionOut(BaseModel):
    id: str
    tenant_id: str
    plan_id: str
    plan_key: str
    effective_at: datetime
    ended_at: datetime | None
    created_at: datetime


class SubscriptionList(BaseModel):
    items: list[SubscriptionOut]


# --- invoices ------------------------------------------------------------------------------


class InvoiceLineOut(BaseModel):
    id: str
    price_id: str | None
    metric: str | None
    quantity: int
    amount: int
    dimensions: dict[str, str | None] | None = None


class InvoiceOut(BaseModel):
    id: str
    tenant_id: str
    period_start: datetime
    period_end: datetime
    status: Literal["draft", "open", "paid", "void", "uncollectible"]
    total_amount: int
    currency: str
    provider_invoice_id: str | None
    created_at: datetime
    number: str | None = None
    finalized_at: datetime | None = None
    paid_at: datetime | None = None
    voided_at: datetime | None = None


class CreditNoteLineIn(_In):
    amount: Annotated[int, Field(gt=0, le=MAX_BIGINT, strict=True)]
    invoice_line_id: Annotated[str | None, StringConstraints(min_length=1, max_length=36)] = None
    description: Annotated[str | None, StringConstraints(min_length=1, max_length=200)] = None


class CreditNoteIn(_In):
    """An `amount`, or `lines` adding up to it (not both), and a `reason`."""

    amount: Annotated[int | None, Field(gt=0, le=MAX_BIGINT, strict=True)] = None
    lines: Annotated[list[CreditNoteLineIn] | None, Field(min_length=1, max_length=100)] = None
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)]


class CreditNoteLineOut(BaseModel):
    invoice_line_id: str | None
    description: str | None
    amount: int


class CreditNoteOut(BaseModel):
    id: str
    invoice_id: str
    number: str
    amount: int
    currency: str
    reason: str
    created_at: datetime
    lines: list[CreditNoteLineOut]


class InvoiceDetail(InvoiceOut):
    """An invoice with its first lines (`next_lines_cursor` pages through the rest at
    `/invoices/{id}/lines`) and its credit notes."""

    lines: list[InvoiceLineOut]
    next_lines_cursor: str | None = None
    credit_notes: list[CreditNoteOut] = []


class InvoiceLinePage(BaseModel):
    """Lines of one invoice in a stable order; pass `next_cursor` for more."""

    items: list[InvoiceLineOut]
    next_cursor: str | None = None


class PreviewLineOut(BaseModel):
    price_id: str | None
    metric: str | None
    quantity: int
    amount: int
    dimensions: dict[str, str | None] | None = None


class InvoicePreviewOut(BaseModel):
    """What an invoice of the period would bill if generated now (nothing is stored)."""

    tenant_id: str
    period_start: datetime
    period_end: datetime
    currency: str
    total_amount: int
    lines: list[PreviewLineOut]


class InvoicePage(BaseModel):
    """Invoices ordered by period start (then id); pass `next_cursor` for more."""

    items: list[InvoiceOut]
    next_cursor: str | None = None


# --- quotas --------------------------------------------------------------------------------


class QuotaOut(BaseModel):
    """Where the tenant stands against one entitlement of its current plan."""

    key: str
    window: Window
    limit: int
    used: int
    remaining: int
    reset_at: datetime


class QuotaList(BaseModel):
    """The current plan's entitlements; empty without a subscription (no limits apply)."""

    items: list[QuotaOut]
