"""`GET /usage?group_by=...`: a metric's daily aggregates per group of values (`usage_aggregates`
rows with a group, written by `aggregate_daily` for a meter with `group_by`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.api.pagination import keyset_page
from billing.api.problems import invalid_field
from billing.api.schemas import UsagePage, UsagePeriod
from billing.meters import get_meter
from billing.models import UsageAggregate
from billing.tenants import tenant_zone


def grouped_usage(
    session: Session,
    *,
    tenant_id: str,
    metric: str | None,
    group_by: Sequence[str],
    granularity: str,
    bounds: tuple[datetime | None, datetime | None],
    limit: int,
    cursor: str | None,
) -> UsagePage:
    """One page of the tenant's per-group daily totals of `metric`, by period start and group.

    Raises:
        ProblemError: 422 when `metric` is missing, `granularity` is not `day`, or `group_by`
            is not the set of the meter's groups.
    """
    if metric is None:
        raise invalid_field("metric", "group_by needs a metric", location="query")
    if granularity != "day":
        raise invalid_field(
            "granularity", "group_by reads the daily aggregates: use day", location="query"
        )
    meter = get_meter(session, metric)
    if sorted(group_by) != sorted(meter.group_by):
        groups = ", ".join(meter.group_by) or "none"
        raise invalid_field(
            "group_by", f"the meter of {metric} groups by: {groups}", location="query"
        )
    query = select(UsageAggregate).where(
        UsageAggregate.tenant_id == tenant_id,
        UsageAggregate.metric == metric,
        UsageAggregate.granularity == "day",
        UsageAggregate.group_key != "",
    )
    start, end = bounds
    if start is not None:
        query = query.where(UsageAggregate.period_start >= start)
    if end is not None:
        query = query.where(UsageAggregate.period_start < end)
    order = (UsageAggregate.period_start, UsageAggregate.group_key)
    rows, next_cursor = keyset_page(session, query, order, limit, cursor)
    tz = tenant_zone(session, tenant_id)
    items = [
        UsagePeriod(
            period_start=row.period_start.astimezone(tz),
            granularity="day",
            metric=row.metric,
            total=row.total,
            group=json.loads(row.group_key),
        )
        for row in rows
    ]
    return UsagePage(items=items, next_cursor=next_cursor)
