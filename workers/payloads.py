"""The job payloads, exactly as the contract gives them, validated before anything runs.

`billing.aggregate_daily` `{tenant_id, metric, day_start}`, `billing.generate_monthly_invoice`
`{tenant_id, period_start, period_end, currency}` and `billing.sync_invoice` `{invoice_id}`;
datetimes travel as ISO 8601 strings with an offset. A missing, extra, empty or badly typed
field, or a datetime without an offset, raises `InvalidPayloadError`: a job never runs on a
guessed value.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    ValidationError,
)

from workers.errors import InvalidPayloadError


def _iso_string(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 string with an offset")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 datetime") from None


#: The instants a job may name: a day or a month after them, in any zone, is still a datetime.
EARLIEST = datetime(2, 1, 1, tzinfo=UTC)
LATEST = datetime(9998, 12, 31, tzinfo=UTC)
_OUT_OF_RANGE = f"must be from {EARLIEST.date().isoformat()} to {LATEST.date().isoformat()} (UTC)"


def _as_utc(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # past year 1 or 9999 once in UTC
        raise ValueError(_OUT_OF_RANGE) from None
    if not EARLIEST <= utc <= LATEST:
        raise ValueError(_OUT_OF_RANGE)
    return utc


NonBlank = Annotated[str, StringConstraints(strict=True, min_length=1, pattern=r"\S")]
"""A string with at least one non-space character."""

IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_string), AfterValidator(_as_utc)]
"""An ISO 8601 string with an offset, read as an aware datetime in UTC."""


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AggregateDailyPayload(_Payload):
    """`billing.aggregate_daily`: total `metric` of `tenant_id` over its local day holding
    `day_start` (the UTC day for a tenant without a zone)."""

    tenant_id: NonBlank
    metric: NonBlank
    day_start: IsoDatetime


class MonthlyInvoicePayload(_Payload):
    """`billing.generate_monthly_invoice`: invoice `[period_start, period_end)` in `currency`."""

    tenant_id: NonBlank
    period_start: IsoDatetime
    period_end: IsoDatetime
    currency: NonBlank


class SyncInvoicePayload(_Payload):
    """`billing.sync_invoice`: send invoice `invoice_id` (of whichever tenant) to the provider."""

    invoice_id: NonBlank


class FinalizeInvoicePayload(_Payload):
    """`billing.finalize_invoice`: finalize draft `invoice_id` (of whichever tenant)."""

    invoice_id: NonBlank


P = TypeVar("P", bound=_Payload)


def parse_payload(model: type[P], payload: object, *, job: str) -> P:
    """Validate a job's payload into `model`.

    Raises:
        InvalidPayloadError: the payload is not a mapping, or a field is missing, extra, empty
            or badly typed; its message names every bad field.
    """
    if not isinstance(payload, Mapping):
        raise InvalidPayloadError(
            f"{job} payload must be an object, got {type(payload).__name__}", job=job
        )
    try:
        return model.model_validate(dict(payload))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in error.errors()
        )
        raise InvalidPayloadError(f"{job} payload rejected: {problems}", job=job) from None
