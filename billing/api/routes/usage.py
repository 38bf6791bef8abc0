"""`POST /usage`, `POST /usage/batch` and `GET /usage`: record usage and read its totals.

Recording goes through `BillingService`, so the HTTP API and the Python API store events by
the same rules (one per tenant, metric and idempotency key). An event sent without `at` takes
the server's clock, or, when its key is already stored with the same amount, the stored time:
a client retrying such a request gets the duplicate answer rather than a conflict.

Totals come from `usage_counters`, which count every event the moment it is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from billing.api.auth import Reader, Writer
from billing.api.deps import ApiDep, BillingApi, SessionDep
from billing.api.grouped_usage import grouped_usage
from billing.api.models import UsageCounter
from billing.api.pagination import keyset_page
from billing.api.problems import ProblemError, field_errors, problem_responses
from billing.api.schemas import (
    BatchItemError,
    BatchItemResult,
    Granularity,
    StoredMetric,
    UsageBatchIn,
    UsageBatchOut,
    UsageIn,
    UsagePage,
    UsagePeriod,
    UsageRecorded,
    UTCInstant,
)
from billing.errors import (
    IdempotencyConflictError,
    InvalidUsageError,
    PeriodClosedError,
    TooManyMetricsError,
)
from billing.ledger import Recorded, stored_events
from billing.service import BillingService
from billing.tenants import tenant_zone

router = APIRouter(tags=["usage"])

Stored = dict[tuple[str, str], tuple[str, int, datetime]]


@router.post(
    "/usage",
    status_code=202,
    summary="Record one usage event",
    responses={
        200: {"model": UsageRecorded, "description": "Recorded before: the first event's id"},
        **problem_responses(400, 401, 403, 409, 413, 415, 422),
    },
)
def record_usage(
    body: UsageIn,
    response: Response,
    principal: Writer,
    session: SessionDep,
    api: ApiDep,
) -> UsageRecorded:
    """202 with the new event's id; 200 with `duplicate: true` and the first id when the same
    event was recorded before; 409 when its key was used with another amount or time, or (with
    `LATE_USAGE=reject`) when its time falls in a period that has a finalized invoice
    (`urn:billing:problem:period-closed`, with `period_start` and `period_end`)."""
    service = _service(session, principal.tenant_id, api)
    if body.at is None:  # stored now, or a retry of the event stored with this key
        recorded = service.ingest_untimed(
            metric=body.metric,
            amount=body.amount,
            idempotency_key=body.idempotency_key,
            metadata=body.metadata,
        )
    else:
        recorded = service.ingest_event(**_fields(body, body.at))
    session.commit()
    if recorded.duplicate:
        response.status_code = 200
    return UsageRecorded(id=recorded.id, duplicate=recorded.duplicate)


@router.post(
    "/usage/batch",
    summary="Record up to 1,000 usage events",
    responses=problem_responses(400, 401, 403, 413, 415, 422),
)
def record_usage_batch(
    body: UsageBatchIn,
    principal: Writer,
    session: SessionDep,
    api: ApiDep,
) -> UsageBatchOut:
    """A result per event, in order: `accepted`, `duplicate` (with the first id) or `rejected`
    (with the error). With `all_or_nothing`, one rejected event stores none: 422 listing them;
    so does a batch whose every event is rejected."""
    now = api.clock()
    parsed = [_parse(raw) for raw in body.events]
    valid = [(index, item) for index, item in enumerate(parsed) if isinstance(item, UsageIn)]
    stored = _stored(session, principal.tenant_id, [item for _, item in valid])
    service = _service(session, principal.tenant_id, api)
    recorded = _record_all(service, [(item, _time_of(item, stored, now)) for _, item in valid])
    results = _in_order(parsed, valid, recorded)
    rejected = [(i, r.error) for i, r in enumerate(results) if r.error is not None]
    if rejected and (body.all_or_nothing or len(rejected) == len(results)):
        session.rollback()
        raise _batch_rejected(rejected, len(results))
    session.commit()
    return UsageBatchOut(results=results)


@router.get(
    "/usage",
    summary="Usage totals per day or month of the tenant's time zone",
    responses=problem_responses(401, 403, 422),
)
def list_usage(
    principal: Reader,
    session: SessionDep,
    metric: Annotated[StoredMetric | None, Query()] = None,
    from_: Annotated[UTCInstant | None, Query(alias="from")] = None,
    to: Annotated[UTCInstant | None, Query()] = None,
    granularity: Annotated[Granularity, Query()] = "day",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
    group_by: Annotated[list[str] | None, Query(max_length=5)] = None,
) -> UsagePage:
    """The caller's totals with `from <= period_start < to`, ordered by period start and metric;
    walking `next_cursor` returns every period once. Periods are the tenant's local days and
    months; `period_start` carries its zone's offset (`2025-03-01T00:00:00-05:00`; `Z` on UTC).

    `group_by` (repeatable: `?metric=tokens&group_by=model`) names the metric's meter groups and
    returns the daily aggregates of each group under the meter's aggregation instead, ordered by
    period start and group; it needs `metric` and `granularity=day`."""
    if group_by:
        return grouped_usage(
            session,
            tenant_id=principal.tenant_id,
            metric=metric,
            group_by=group_by,
            granularity=granularity,
            bounds=(from_, to),
            limit=limit,
            cursor=cursor,
        )
    query = select(UsageCounter).where(
        UsageCounter.tenant_id == principal.tenant_id, UsageCounter.granularity == granularity
    )
    if metric is not None:
        query = query.where(UsageCounter.metric == metric)
    if from_ is not None:
        query = query.where(UsageCounter.period_start >= from_)
    if to is not None:
        query = query.where(UsageCounter.period_start < to)
    order = (UsageCounter.period_start, UsageCounter.metric)
    rows, next_cursor = keyset_page(session, query, order, limit, cursor)
    tz = tenant_zone(session, principal.tenant_id)
    items = [
        UsagePeriod(
            period_start=row.period_start.astimezone(tz),
            granularity=granularity,
            metric=row.metric,
            total=row.total,
        )
        for row in rows
    ]
    return UsagePage(items=items, next_cursor=next_cursor)


def _service(session: Session, tenant_id: str, api: BillingApi) -> BillingService:
    """The tenant's service, refusing usage older than `USAGE_MAX_AGE` or ahead of the clock,
    late usage as `LATE_USAGE` says, and new metrics past `MAX_METRICS_PER_TENANT` in a month."""
    return BillingService(
        session=session,
        tenant_id=tenant_id,
        now=api.clock,
        max_usage_age=api.usage_max_age,
        policy=api.policy(),
        max_metrics_per_tenant=api.max_metrics_per_tenant,
    )


def _parse(raw: Any) -> UsageIn | BatchItemError:
    try:
        return UsageIn.model_validate(raw)
    except ValidationError as error:
        first = field_errors(error.errors(include_url=False))[0]
        return BatchItemError(
            status=422,
            title="Invalid usage",
            detail=f"{first['field']}: {first['detail']}",
            field=first["field"] if first["field"] != "body" else None,
        )


def _in_order(
    parsed: Sequence[UsageIn | BatchItemError],
    valid: Sequence[tuple[int, UsageIn]],
    recorded: Sequence[BatchItemResult],
) -> list[BatchItemResult]:
    """Each event's result at its index, the malformed ones rejected."""
    results = [
        BatchItemResult(status="rejected", error=item if isinstance(item, BatchItemError) else None)
        for item in parsed
    ]
    for (index, _), result in zip(valid, recorded, strict=True):
        results[index] = result
    return results


def _batch_rejected(rejected: Sequence[tuple[int, BatchItemError]], total: int) -> ProblemError:
    return ProblemError(
        422,
        "Batch rejected",
        f"{len(rejected)} of {total} events were rejected; none was stored",
        slug="batch-rejected",
        field=f"events.{rejected[0][0]}",
        errors=[
            {
                "field": f"events.{index}" + (f".{error.field}" if error.field else ""),
                "location": "body",
                "detail": error.detail,
            }
            for index, error in rejected
        ],
    )


def _record_all(
    service: BillingService, items: Sequence[tuple[UsageIn, datetime]]
) -> list[BatchItemResult]:
    """Store the events in one batch; if any is refused, one by one to tell which."""
    if not items:
        return []
    try:
        with service.session.begin_nested():
            outcomes = service.ingest([_fields(item, at) for item, at in items])
    except (
        IdempotencyConflictError,
        InvalidUsageError,
        PeriodClosedError,
        TooManyMetricsError,
        DataError,
        IntegrityError,
    ):
        return [_record_one(service, item, at) for item, at in items]
    return [_result(recorded) for recorded in outcomes]


def _record_one(service: BillingService, item: UsageIn, at: datetime) -> BatchItemResult:
    try:
        with service.session.begin_nested():
            recorded = service.ingest_event(**_fields(item, at))
    except IdempotencyConflictError as error:
        return _rejected(409, "Idempotency key reused", str(error), "idempotency_key")
    except InvalidUsageError as error:
        return _rejected(422, "Invalid usage", str(error), error.field)
    except PeriodClosedError as error:
        return _rejected(409, "Period closed", str(error), "at")
    except TooManyMetricsError as error:
        return _rejected(422, "Too many metrics", str(error), "metric")
    except DataError:
        return _rejected(400, "Value not storable", "a value cannot be stored", None)
    except IntegrityError:
        return _rejected(409, "Conflict", "conflicts with data already stored", None)
    return _result(recorded)


def _result(recorded: Recorded) -> BatchItemResult:
    return BatchItemResult(id=recorded.id, status="duplicate" if recorded.duplicate else "accepted")


def _fields(item: UsageIn, at: datetime) -> dict[str, Any]:
    return {
        "metric": item.metric,
        "amount": item.amount,
        "at": at,
        "idempotency_key": item.idempotency_key,
        "metadata": item.metadata,
    }


def _rejected(status: int, title: str, detail: str, field: str | None) -> BatchItemResult:
    error = BatchItemError(status=status, title=title, detail=detail, field=field)
    return BatchItemResult(status="rejected", error=error)


def _stored(session: Session, tenant_id: str, items: Sequence[UsageIn]) -> Stored:
    """Stored events with the (metric, key) of items sent without `at`: id, amount and time.

    Only those need a look: an event sent without a time is a retry of a stored one when its
    key and amount match, and then takes the stored time instead of conflicting with it.
    """
    keys = sorted({(item.metric, item.idempotency_key) for item in items if item.at is None})
    if not keys:
        return {}
    found: Stored = {}
    for start in range(0, len(keys), 500):
        rows = stored_events(session, tenant_id, keys[start : start + 500])
        found.update({(m, k): (i, a, at) for i, m, k, a, at in rows})
    return found


def _time_of(item: UsageIn, stored: Stored, now: datetime) -> datetime:
    if item.at is not None:
        return item.at
    previous = stored.get((item.metric, item.idempotency_key))
    if previous is not None and previous[1] == item.amount:
        return previous[2]
    return now
